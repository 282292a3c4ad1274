#!/usr/bin/env bash
# The built wheel works outside the source tree: build it offline from the files git would
# ship, install it into a fresh virtual environment, and from another folder run
# `lap --version`, one lp.prune call and a load of the bundled MNIST (package data), with no
# path into src/. The fresh environment borrows the project venv's third-party packages
# (torch, numpy, ...) through a .pth file instead of installing them again; the editable
# install of lookahead_prune there is not seen (.pth files of a borrowed folder do not run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

mkdir "$TMP/tree"
git ls-files -z -co --exclude-standard -- pyproject.toml README.md LICENSE src \
    | tar --null -T - -cf - | tar -xf - -C "$TMP/tree"
(cd "$TMP/tree" && "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$TMP/dist" .)
WHEEL=$(ls "$TMP"/dist/lookahead_prune-*.whl)

"$PY" -m venv --without-pip "$TMP/venv"
"$PY" -m pip --python "$TMP/venv/bin/python" install -q --no-deps --no-index "$WHEEL"
BORROWED=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OWN=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$BORROWED" > "$OWN/borrowed-from-project-venv.pth"

mkdir "$TMP/elsewhere" "$TMP/empty"
cd "$TMP/elsewhere"
export LAP_DATA="$TMP/empty" XDG_CACHE_HOME="$TMP/empty" OMP_NUM_THREADS=1
unset PYTHONPATH
"$TMP/venv/bin/lap" --version
"$TMP/venv/bin/python" - "$TMP/venv" <<'PY'
import sys
from pathlib import Path

import torch

import lookahead_prune as lp
from lookahead_prune.data import load_dataset

where = Path(lp.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"imported from {where}"
assert (where.parent / "py.typed").is_file(), "py.typed is missing from the wheel"
data = load_dataset("mnist", download=False, subset=100)  # the bundled copy, nothing else
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 10))
report = lp.prune(model, "lap", 0.1)
assert report.kept == round(0.1 * 784 * 32) + round(0.1 * 32 * 10), report
print(f"wheel ok: {where.parent.name} from {where.parent.parent.name}, "
      f"mnist {tuple(data.train_x.shape)}, lap kept {report.kept}/{report.total}")
PY
