"""The exercises both ways: the solutions pass, the blanks and the usual mistakes fail with the paper's claim in
plain words, and a broken exercise gets one line, never a traceback, while the others are still checked."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

import exercises


def student_copy(tmp_path, changes=()):
    """The solution files as a student's folder (marks included), with (file, old, new) changes made."""
    for file in {e.file for e in exercises.EXERCISES}:
        shutil.copy(ROOT / file, tmp_path / file)
    for file, old, new in changes:
        text = (tmp_path / file).read_text()
        assert text.count(old) == 1, (file, old)
        (tmp_path / file).write_text(text.replace(old, new))
    return tmp_path


def failures(student_dir, names=None):
    return {e.name: failure for e, failure in exercises.check(student_dir, names)}


def test_the_solutions_pass():
    assert failures(None) == {e.name: None for e in exercises.EXERCISES}


def test_the_blanks_keep_the_instructions_and_fail_as_blank(tmp_path):
    exercises.make(tmp_path)
    for e in exercises.EXERCISES:
        solution, student = (ROOT / e.file).read_text(), (tmp_path / e.file).read_text()
        blocks = exercises.regions(solution.splitlines(), e.name)
        assert blocks and len(exercises.regions(student.splitlines(), e.name)) == len(blocks)
        hidden = [line for first, end in blocks for line in solution.splitlines()[first:end] if line.strip()]
        assert not [line for line in hidden if line in student.splitlines()], e.name  # the answer is gone
    result = failures(tmp_path)
    for e in exercises.EXERCISES:
        assert result[e.name].startswith("still blank: write it between its marks") and e.file in result[e.name]
    with pytest.raises(FileExistsError):  # a student's work is never written over
        exercises.make(tmp_path)


def test_the_solution_lines_put_back_into_the_blanks_give_the_solutions(tmp_path):
    """Nothing but the marked lines differs: the student versions cannot drift from the solutions."""
    exercises.make(tmp_path)
    for file in {e.file for e in exercises.EXERCISES}:
        text = (tmp_path / file).read_text()
        for e in exercises.EXERCISES:
            if e.file == file:
                text, _ = exercises.splice(text, (ROOT / file).read_text(), e.name, file)
        assert text == (ROOT / file).read_text()


EMA = "torch._foreach_mul_(t_params, m)\n    torch._foreach_add_(t_params, s_params, alpha=1 - m)"
MISTAKES = [  # (exercise, file, solution text, mistaken text, words of the claim that fails)
    ("multicrop", "train.py", "dino.teacher(crops[:2])", "dino.teacher(crops)",
     "the teacher should see only the 2 global crops"),
    ("multicrop", "train.py", "dino.student(crops)", "dino.student(crops[:2])", "the student should see every crop"),
    ("centering", "04_loss.py", "(teacher_output - self.center) / self.teacher_temp(epoch), dim=-1)",
     "teacher_output / self.teacher_temp(epoch), dim=-1)", "the teacher's output is not centred"),
    ("centering", "04_loss.py", "(teacher_output - self.center) / self.teacher_temp(epoch), dim=-1)",
     "(teacher_output - self.center) / self.student_temp, dim=-1)", "the teacher is not sharpened"),
    ("centering", "04_loss.py", "log_pt = F.log_softmax(", "log_pt = F.softmax(",
     "P_t is not a probability distribution"),
    ("centering", "04_loss.py", "alpha=1 - self.center_momentum)", "alpha=self.center_momentum)",
     "the centre does not follow c <- m c + (1 - m)"),
    ("pairs", "04_loss.py", "if v == iq:", "if False:", "the loss pairs a view with itself"),
    ("pairs", "04_loss.py", "loss = total / n_terms", "loss = total", "the loss adds the 6 pairs up"),
    ("pairs", "04_loss.py", "enumerate(log_ps):", "enumerate(log_ps[:2]):", "the loss leaves the local crops out"),
    ("pairs", "04_loss.py", "torch.sum(-q * log_p, dim=-1).mean()", "torch.sum(-q * log_p, dim=-1).mean().item()",
     "the loss does not reach the student"),
    ("pairs", "04_loss.py", "torch.sum(-q * log_p, dim=-1).mean()", "torch.sum(-q * log_p)",
     "the loss is not the mean over the 2 (V - 1) = 6 pairs"),
    ("ema", "05_teacher_ema.py", EMA, EMA.replace(", m)", ", 1 - m)").replace("alpha=1 - m", "alpha=m"),
     "with m = 1 the teacher should not move"),  # m and 1 - m swapped
    ("ema", "05_teacher_ema.py", EMA, "t_params = [m * t + (1 - m) * s for t, s in zip(t_params, s_params)]",
     "but it did not move: update its tensors in place"),
    ("ema", "05_teacher_ema.py", "(1 + np.cos(np.pi * iters / len(iters)))", "(2 - 2 * iters / len(iters))",
     "the teacher momentum should follow a cosine"),
    ("ema", "05_teacher_ema.py", "np.pi * iters / len(iters)",
     "np.pi * (iters + warmup_iters) / (len(iters) + warmup_iters)",
     "after a warm-up"),
    ("knn", "06_knn.py", ".topk(k, dim=1)", ".topk(k, dim=1, largest=False)",
     "the training images most similar to the query"),
    ("knn", "06_knn.py", "(sim / T).exp())", "torch.ones_like(sim))", "the vote is not weighted"),
    ("knn", "06_knn.py", "(sim / T).exp())", "(sim / 0.07).exp())", "the vote is not weighted"),
    ("knn", "06_knn.py", ".topk(k, dim=1)", ".topk(min(k, 2), dim=1)", "the votes of a class should add up"),
    ("attention", "07_attention.py", "mask = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)",
     "mask = keep_sorted", "the mask should keep the patches with the most attention, where they are"),
    ("attention", "07_attention.py", "mask = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)",
     "mask = torch.zeros_like(flat).scatter(1, idx, val * keep_sorted)", "kept (True, 1) or not (False, 0)"),
    ("attention", "07_attention.py", "before < threshold", "val.cumsum(dim=1) < threshold",
     "should hold at least 60 %"),
    ("attention", "07_attention.py", "before < threshold", "before < threshold + 0.1", "the smallest set of patches"),
]


@pytest.mark.parametrize("name, file, old, new, words", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_each_claim_fails_on_its_mistake(tmp_path, name, file, old, new, words):
    assert words in (failures(student_copy(tmp_path, [(file, old, new)]), [name])[name] or "passed")


def test_broken_exercises_get_one_plain_line_and_the_others_are_still_checked(tmp_path):
    student = student_copy(tmp_path, [
        ("04_loss.py", "        total, n_terms = 0.0, 0\n", "        total, n_terms = (0.0, 0\n"),  # a syntax error
        ("04_loss.py", "F.log_softmax((teacher_output - self.center) / self.teacher_temp(epoch), dim=-1)",
         "teacher_output * float('nan')"),
        ("06_knn.py", "votes.scatter_add_(1, train_labels[idx], (sim / T).exp())", "votes = votes / 0 + undefined"),
        ("07_attention.py", "torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)", "keep_sorted[:, :1]"),
    ])
    ema = student / "05_teacher_ema.py"
    ema.write_text(ema.read_text().replace("# end exercise", ""))  # the marks broken
    run = subprocess.run([sys.executable, "-m", "exercises", "check", "--student", str(student)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr, run.stderr
    lines = {line.split()[0]: line for line in run.stdout.splitlines()[1:-1]}
    assert "PASS" in lines["multicrop"]
    assert "FAIL  a syntax error" in lines["pairs"] and f"{student / '04_loss.py'}, line" in lines["pairs"]
    assert "FAIL  the loss is nan" in lines["centering"]
    assert "FAIL  your code raised NameError: name 'undefined' is not defined" in lines["knn"]
    assert "FAIL  your code raised RuntimeError: shape '[3, 4, 5]' is invalid for input of size 3 (07_attention.py, " \
           "line" in lines["attention"] and "after your lines" in lines["attention"]  # a mask of the wrong shape
    assert "FAIL  exercise ema has a mark without its '# end exercise' (line" in lines["ema"]
    assert run.stdout.splitlines()[-1] == "1 of 6 pass"
