"""Test-only launcher of fairseq command-line runs: imports fairseq once, then forks one child
process per run.

Importing torch and fairseq costs about 5 CPU seconds per process, more than a tiny training run
itself; the end-to-end tests start a dozen runs on a 2-core CI machine. Each run is still its own
process (fresh state, its own log), entered through the same ``cli_main`` as the ``fairseq-train``
and ``fairseq-eval-lm`` console scripts, with ``--user-dir`` parsed as usual.

Protocol, one JSON object per line. Request on stdin::

    {"id": 1, "entry": "train" | "eval_lm" | "generate", "argv": [...], "log": PATH, "env": {...}, "cwd": DIR}

Replies on stdout: ``{"id": 1, "pid": PID}`` once forked, ``{"id": 1, "rc": CODE}`` when it ended.
The server exits when stdin closes and every child has ended.
"""

import json
import os
import select
import sys
import time
import traceback


def _child(request: dict, entries: dict, proto_fd: int) -> None:
    code = 1
    try:
        os.close(proto_fd)
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.update(request.get("env") or {})
        os.chdir(request["cwd"])
        sys.argv = ["fairseq-" + request["entry"].replace("_", "-"), *request["argv"]]
        entries[request["entry"]]()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: B902 - reported in the run's log
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    # Replies go to a private copy of stdout; anything else the server prints goes to stderr.
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    proto = os.fdopen(proto_fd, "w", buffering=1)

    def reply(**message):
        proto.write(json.dumps(message) + "\n")
        proto.flush()

    import fairseq_cli.eval_lm
    import fairseq_cli.generate
    import fairseq_cli.train

    import agg_traced_task  # noqa: F401 (registers language_modeling_agg_traced)
    import fairseq_agg  # noqa: F401

    entries = {
        "train": fairseq_cli.train.cli_main,
        "eval_lm": fairseq_cli.eval_lm.cli_main,
        "generate": fairseq_cli.generate.cli_main,
    }
    reply(ready=True)

    children = {}
    buffer = b""
    stdin_open = True
    while stdin_open or children:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            reply(id=children.pop(pid), rc=os.waitstatus_to_exitcode(status))
        if not stdin_open:
            time.sleep(0.05)
            continue
        readable, _, _ = select.select([0], [], [], 0.05)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            stdin_open = False
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, entries, proto_fd)
            children[pid] = request["id"]
            reply(id=request["id"], pid=pid)


if __name__ == "__main__":
    main()
