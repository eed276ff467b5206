import sys

from fusionlib.bench import BENCHMARKS, run

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(f"usage: python -m fusionlib.bench {{{','.join(BENCHMARKS)}}} [options]")
    raise SystemExit(0 if len(sys.argv) >= 2 else 2)
run(sys.argv[1], sys.argv[2:])
