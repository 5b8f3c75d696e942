"""Evaluation: code-execution scoring (HumanEval, MBPP and their Pro versions) and pass@k.

Modules: `benchmarks` (problems, prompts, programs), `sandbox` (isolated execution),
`scoring` (parallel scoring of samples), `pass_at_k` (unbiased estimator). Import them directly;
this package imports nothing eagerly so that importing one module stays cheap.
"""
