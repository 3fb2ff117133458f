"""`python -m tooling.env CMD...`: run CMD with the generated .env loaded under the caller's own settings."""

import os
import sys

from tooling.services import load_env_file

if __name__ == "__main__":
    load_env_file()
    if len(sys.argv) < 2:
        print("usage: python -m tooling.env COMMAND [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    cmd = sys.argv[1]
    if cmd == "mlp":  # the project's console script, from the same environment
        cmd = os.path.join(os.path.dirname(sys.executable), "mlp")
    os.execvp(cmd, [cmd, *sys.argv[2:]])
