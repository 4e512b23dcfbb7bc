"""python -m exercises make DIR | check [--student DIR] [NAME ...]"""
import argparse
import sys

from exercises import BY_NAME, EXERCISES, check, make

parser = argparse.ArgumentParser(prog="python -m exercises", description=__doc__.split("\n")[0])
commands = parser.add_subparsers(dest="command", required=True)
commands.add_parser("make", help="write the student versions into DIR").add_argument("dir")
checking = commands.add_parser("check", help="check the exercises: a student's (--student DIR) or the solutions")
checking.add_argument("--student", metavar="DIR", help="the folder made by `make`; default: the solutions")
checking.add_argument("names", nargs="*", metavar="NAME",
                      help="only these exercises: " + ", ".join(e.name for e in EXERCISES))
args = parser.parse_args()
unknown = [name for name in getattr(args, "names", []) if name not in BY_NAME]
if unknown:
    parser.error(f"no exercise {unknown[0]!r}; the exercises: {', '.join(BY_NAME)}")

if args.command == "make":
    try:
        files = make(args.dir)
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {', '.join(map(str, files))}; the exercises:")
    for e in EXERCISES:
        print(f"  {e.name:10s} {e.file:18s} {e.title}")
    print(f"check them with: python -m exercises check --student {args.dir}")
else:
    results = check(args.student, args.names)
    print(f"the exercises in {args.student or 'the solutions'} (only the lines between each exercise's marks count)")
    for e, failure in results:
        print(f"  {e.name:10s} {'PASS' if failure is None else 'FAIL'}  {e.title if failure is None else failure}")
    passed = sum(failure is None for _, failure in results)
    print(f"{passed} of {len(results)} pass")
    sys.exit(0 if passed == len(results) else 1)
