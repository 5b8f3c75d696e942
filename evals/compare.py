"""python evals/compare.py runs/a runs/b ...  — one table across runs (see moejax.evals.compare)."""
import sys

from moejax.evals import compare


def main(argv: list[str]) -> int:
  if not argv:
    print("usage: python evals/compare.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
    return 2
  try:
    print(compare.table(argv))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
