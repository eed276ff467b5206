"""nbgrader's settings for teaching with the Fusion book: every `nbgrader` command run from the repository root reads them.

The course lives in `assignments/` (built by `make assignments`, not committed):
source/<chapter>/ holds the instructor chapters, release/ the student versions,
submitted/<student>/<chapter>/ the submissions, autograded/ and feedback/ what grading
makes of them, and gradebook.db the cells, points and scores. The README's "Teaching
with it" walks through the commands.
"""

import os
import pathlib

HERE = pathlib.Path(__file__).resolve().parent

c = get_config()  # noqa: F821 - provided by traitlets when it reads this file

c.CourseDirectory.root = str(HERE / "assignments")
c.CourseDirectory.course_id = "fusion"

# Autograding executes each submitted chapter whole, training cells included. The smoke profile
# sizes them to seconds (chapter 1 runs in about 20 s); the exercises' checks do not depend on it.
# Set FUSIONLIB_PROFILE yourself to grade with another profile (then raise the timeout).
os.environ.setdefault("FUSIONLIB_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
# Caches and checkpoints are read from this repository wherever the course folder is.
os.environ.setdefault("FUSIONLIB_ROOT", str(HERE))
# Seconds one cell may run while autograding (nbgrader's default, 30, is too short for a cold cache).
c.Execute.timeout = 300
# A submission that lost a locked check cell gets it back, so every check is graded.
c.OverwriteCells.add_missing_cells = True
