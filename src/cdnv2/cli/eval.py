"""cdnv2-eval (placeholder until its issue lands)."""
import sys


def main() -> int:
    print("cdnv2-eval: not yet available in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
