"""Eval-worker suites: what `python evals/worker.py --suite NAME` measures on every checkpoint.

  demo  tiny and fast on 2 CPU cores (`make demo`): the first 10 HumanEval problems, greedy, 64 new
        tokens; canonical-solution NLL on the first 20; throughput at batch 1 and 8 (64-token prompts,
        16 new tokens, 2 timed repeats).
  full  all 164 HumanEval problems (+ MBPP test split with --mbpp_path, + HumanEval/MBPP Pro with
        --humaneval_pro_path / --mbpp_pro_path), greedy pass@1 with 512 new tokens; NLL on every
        problem; throughput at batch 1, 8 and 32 (128-token prompts, 64 new tokens, 3 repeats).
  sampled  like full but n=20 samples at T=0.2, top-p 0.95 (methods.md Sec. 7.3), pass@1/5/10.

Fields: moejax.evals.worker.Suite. Any field can be overridden from the command line
(`--override max_problems=20`) or as a keyword of `worker.run` / `worker.evaluate_once`.
"""
from moejax.evals.worker import Suite

SUITES = {
    "demo": Suite(name="demo", max_problems=10, max_new_tokens=64, gen_batch_size=8,
                  nll_problems=20, throughput_batch_sizes=(1, 8), throughput_prompt_len=64,
                  throughput_new_tokens=16, throughput_repeats=2),
    "full": Suite(name="full", max_problems=0, max_new_tokens=512, gen_batch_size=32,
                  nll_problems=0, throughput_batch_sizes=(1, 8, 32), throughput_prompt_len=128,
                  throughput_new_tokens=64, throughput_repeats=3),
    "sampled": Suite(name="sampled", n_samples=20, ks=(1, 5, 10), temperature=0.2, top_p=0.95,
                     max_new_tokens=512, gen_batch_size=32, throughput_batch_sizes=(1, 8, 32)),
}
