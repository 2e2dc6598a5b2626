#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter (LeRobot 0.6.1 needs it), or explain and fail.
# pyenv shims such as `python3.12` exist but only answer when that version is selected, so every
# candidate is actually run before it is trusted.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
candidates=("${PYTHON:-}" python3.12 python3.13 python3)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for p in "$root"/versions/3.1[2-9]*/bin/python3; do candidates+=("$p"); done
fi
for p in /usr/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.13 /usr/local/bin/python3.13; do
  candidates+=("$p")
done
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  path=$(command -v "$c" 2>/dev/null) || continue
  if ok "$path"; then
    # resolve a pyenv shim to the real interpreter
    "$path" -c 'import sys; print(sys.executable)'
    exit 0
  fi
done
echo "error: no Python >= 3.12 found (LeRobot 0.6.1 needs it). Install one (e.g. 'pyenv install 3.12'," \
     "or apt-get install python3.12) or point PYTHON=/path/to/python3.12 at it." >&2
exit 1
