"""Exercises made from the solutions: the lines of the code that are the paper's concepts, blanked for students,
and a check that judges a student's lines by the paper's claims (claims.py).

In a solution file, an exercise is the lines between two marks; the comment lines right after the first mark are
the instruction, and the student's version keeps them:

    # exercise NAME: what to write, in the paper's symbols
    ...the solution...
    # end exercise

    python -m exercises make DIR                 # the student versions, each exercise's lines blanked
    python -m exercises check --student DIR      # per exercise: PASS, or the claim that fails
    python -m exercises check                    # the solutions themselves: all pass

Each exercise is judged alone: its lines from the student's file replace the solution's lines in the solution
file, and only that module is run, so a broken exercise never fails another, and only the lines between the
marks count.
"""
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exercises import claims  # noqa: E402  (after ROOT is on the path: the claims import the project)

BEGIN, END = "# exercise ", "# end exercise"


@dataclass
class Exercise:
    name: str
    file: str  # the solution file that holds its marks
    title: str  # what the student writes, and where the paper says it
    check: Callable  # check(module) raises claims.Failed with the claim in plain words


EXERCISES = [
    Exercise("multicrop", "train.py", "which crops the teacher and the student see (Sec. 3.1, multi-crop)",
             claims.multicrop),
    Exercise("centering", "04_loss.py", "centering and sharpening of the teacher's output (Sec. 3.1, Alg. 1)",
             claims.centering),
    Exercise("pairs", "04_loss.py", "the loss over the 2 (V - 1) pairs of different views (Sec. 3.1)", claims.pairs),
    Exercise("ema", "05_teacher_ema.py", "the momentum teacher and its cosine schedule (Sec. 3.1)", claims.ema),
    Exercise("knn", "06_knn.py", "the weighted k-NN vote (Sec. 4.1)", claims.knn),
    Exercise("attention", "07_attention.py", "the mask holding 60 % of a head's attention (Fig. 3)", claims.attention),
]
BY_NAME = {e.name: e for e in EXERCISES}


class MarksError(Exception):
    pass


def regions(lines, name):
    """[(first, end)]: the line indices of each block of exercise `name`, its instruction excluded (end: its
    end mark). A file may hold several blocks of one exercise."""
    found, first = [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith(BEGIN) and text[len(BEGIN):].split(":")[0] == name:
            if first is not None:
                break
            first, mark = i + 1, i + 1
            while first < len(lines) and lines[first].strip().startswith("#") and lines[first].strip() != END:
                first += 1  # the instruction
        elif text == END and first is not None:
            found.append((first, i))
            first = None
    if first is not None:
        raise MarksError(f"exercise {name} has a mark without its '{END}' (line {mark}): keep both marks around "
                         f"your lines")
    return found


def blank(text, names):
    """The student version of a solution file: each block of the named exercises becomes one line that raises."""
    lines = text.splitlines(keepends=True)
    cuts = sorted(r for name in names for r in [(*b, name) for b in regions(lines, name)])
    for first, end, name in reversed(cuts):
        indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        lines[first:end] = [f'{indent}raise NotImplementedError("exercise {name}: write it here")\n']
    return "".join(lines)


def make(out_dir):
    """Write the student versions of every file that holds exercises into out_dir; never over a student's file."""
    out_dir = Path(out_dir)
    files = sorted({e.file for e in EXERCISES})
    taken = [out_dir / f for f in files if (out_dir / f).exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists already (a student's work?): choose another folder, or remove it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in files:
        text = (ROOT / file).read_text()
        (out_dir / file).write_text(blank(text, [e.name for e in EXERCISES if e.file == file]))
    return [out_dir / f for f in files]


def splice(solution, student, name, label):
    """The solution's lines with exercise `name`'s blocks taken from the student's, and for each line of the
    result where it comes from: (file, line number)."""
    sol, stu = solution.splitlines(keepends=True), student.splitlines(keepends=True)
    sol_blocks, stu_blocks = regions(sol, name), regions(stu, name)
    if len(stu_blocks) != len(sol_blocks):
        raise MarksError(f"its marks are gone from {label}: keep the lines '{BEGIN}{name}: ...' and '{END}' around "
                         f"your lines ({len(sol_blocks)} block(s))")
    lines, origin, at = [], [], 0
    for (s0, s1), (t0, t1) in zip(sol_blocks, stu_blocks):
        lines += sol[at:s0] + stu[t0:t1]
        origin += [("solution", n + 1) for n in range(at, s0)] + [(label, n + 1) for n in range(t0, t1)]
        at = s1
    lines += sol[at:]
    origin += [("solution", n + 1) for n in range(at, len(sol))]
    return "".join(lines), origin


def where(origin, lineno, file):
    if not lineno:
        return file
    source, n = origin[min(lineno, len(origin)) - 1]
    return f"{file}, line {n}, after your lines" if source == "solution" else f"{source}, line {n}"


def judge(exercise, student_dir=None):
    """None if the exercise passes, else what is wrong in plain words (never a traceback)."""
    solution = (ROOT / exercise.file).read_text()
    path = ROOT / exercise.file if student_dir is None else Path(student_dir) / exercise.file
    if not path.exists():
        return f"{path} is missing: make the exercises with `python -m exercises make {student_dir}`"
    label = exercise.file if student_dir is None else str(path)
    filename = f"<exercise {exercise.name}>"  # tells the student's module apart in a traceback
    try:
        text, origin = splice(solution, path.read_text(), exercise.name, label)
        code = compile(text, filename, "exec")
    except MarksError as e:
        return str(e)
    except SyntaxError as e:
        return f"a syntax error, {e.msg} ({where(origin, e.lineno, exercise.file)})"
    module = types.ModuleType(f"exercise_{exercise.name}")
    module.__file__ = str(ROOT / exercise.file)
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(code, module.__dict__)
        exercise.check(module)
    except claims.Failed as e:
        return str(e)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
        at = f" ({where(origin, frames[-1].lineno, exercise.file)})" if frames else ""
        if isinstance(e, NotImplementedError) and str(e) == f"exercise {exercise.name}: write it here":
            return f"still blank: write it between its marks{at}"
        message = (str(e).splitlines() or [""])[0][:200]
        return f"your code raised {type(e).__name__}: {message}{at}"
    finally:
        del sys.modules[module.__name__]
    return None


def check(student_dir=None, names=None):
    """[(exercise, None or what fails)] for the named exercises (all by default)."""
    return [(e, judge(e, student_dir)) for e in EXERCISES if not names or e.name in names]
