"""nbgrader's settings for teaching with the Fusion book: every `nbgrader` command run from the repository root reads them.

The course lives in `assignments/` (built by `make assignments`, not committed):
source/<chapter>/ holds the instructor chapters, release/ the student versions,
submitted/<student>/<chapter>/ the submissions, autograded/ and feedback/ what grading
makes of them, and gradebook.db the cells, points and scores. The README's "Teaching
with it" walks through the commands.
"""

import pathlib

HERE = pathlib.Path(__file__).resolve().parent

c = get_config()  # noqa: F821 - provided by traitlets when it reads this file

c.CourseDirectory.root = str(HERE / "assignments")
c.CourseDirectory.course_id = "fusion"

# Autograding executes each submitted chapter whole, training cells included. The smoke profile
# sizes them to seconds (chapter 1 runs in about 20 s); the exercises' checks do not depend on it.
# Caches and checkpoints are read from this repository wherever the course folder is. Both are set
# inside the grading kernels only (JupyterLab's nbgrader extension reads this file too, and its
# kernels must keep the reader's profile); a FUSIONLIB_PROFILE set where nbgrader runs wins.
KERNEL_ENV = {"FUSIONLIB_PROFILE": "smoke", "FUSIONLIB_ROOT": str(HERE)}
c.Execute.extra_arguments = [
    "--IPKernelApp.exec_lines=import os; "
    + "; ".join(f"os.environ.setdefault({k!r}, {v!r})" for k, v in KERNEL_ENV.items())
]
# Seconds one cell may run while autograding (nbgrader's default, 30, is too short for a cold cache).
c.Execute.timeout = 300
# A submission that lost a locked check cell gets it back, so every check is graded.
c.OverwriteCells.add_missing_cells = True
