"""Runs the tlkit CLI with training paused at one batch, so a test can kill it there.

    python tests/paused_cli.py STAGE:EPOCH:BATCH MARKER_FILE fit DATA_DIR ...

At that batch of that stage and epoch, `MARKER_FILE` is written and the process sleeps; the
test waits for the file, then sends its signal. The pause comes through `tlkit.fit`'s
`on_batch_end`, as any Python caller would use it.
"""

import functools
import sys
import time
from pathlib import Path

import tlkit.api
from tlkit.cli import main


def pause_at(target, marker):
    """An `on_batch_end` that writes `marker` and sleeps at `target` ("stage:epoch:batch")."""
    def on_batch_end(stage, epoch, batch):
        if f"{stage}:{epoch}:{batch}" == target:
            Path(marker).write_text("paused")
            time.sleep(3600)

    return on_batch_end


if __name__ == "__main__":
    target, marker, *arguments = sys.argv[1:]
    tlkit.api.fit = functools.partial(tlkit.api.fit, on_batch_end=pause_at(target, marker))
    main(arguments, prog_name="tlkit")
