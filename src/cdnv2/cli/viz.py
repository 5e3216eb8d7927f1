"""cdnv2-viz (placeholder until its issue lands)."""
import sys


def main() -> int:
    print("cdnv2-viz: not yet available in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
