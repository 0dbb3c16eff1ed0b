# Source this file: it creates (once) and activates the virtual environment for this checkout.
# The environment is keyed by a hash of setup.py, so it is rebuilt only when the dependencies change;
# the checkout itself is (re-)linked into it with a cheap no-deps editable install.
_clipkit_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_clipkit_hash=$(sha256sum "$_clipkit_root/setup.py" | cut -c1-12)
CLIPKIT_VENV=${CLIPKIT_VENV:-$HOME/.cache/clipkit/venv-$_clipkit_hash}
_clipkit_python=${CLIPKIT_PYTHON:-python3}

if [ ! -f "$CLIPKIT_VENV/.complete" ]; then
    echo "clipkit: creating the environment in $CLIPKIT_VENV (first run: torch install takes minutes)"
    rm -rf "$CLIPKIT_VENV"
    "$_clipkit_python" -m venv "$CLIPKIT_VENV" || return 1
    "$CLIPKIT_VENV/bin/pip" install -q --upgrade pip || return 1
    # torch first, pinned, so nothing below can pull a different (multi-GB) build.
    "$CLIPKIT_VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 || return 1
    "$CLIPKIT_VENV/bin/pip" install -q -e "$_clipkit_root[test]" || return 1
    touch "$CLIPKIT_VENV/.complete"
fi
# shellcheck disable=SC1091
. "$CLIPKIT_VENV/bin/activate"
# Asked from / so that a checkout in the current folder does not answer for the install (an environment made
# by a checkout that has since moved or gone must be re-linked to this one).
if [ "$(cd / && python -c 'import clipkit, os; print(os.path.dirname(os.path.dirname(os.path.realpath(clipkit.__file__))))' 2>/dev/null)" != "$(realpath "$_clipkit_root")" ]; then
    pip install -q --no-deps -e "$_clipkit_root" >/dev/null || return 1
fi
export HF_HUB_OFFLINE=1
