"""Limits of the machine end in exit 2 with one paragraph: a file size limit while
writing a checkpoint (torch's writer fails with a RuntimeError, not an OSError)."""
import resource
import signal
import subprocess

from helpers import BIN, QUICK, command_env


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_ulimit_f_while_writing_a_checkpoint_is_exit_2(tmp_path):
    """`ulimit -f 300` (300 KiB): the first checkpoint does not fit; it once ended in
    "RuntimeError: [enforce fail at inline_container.cc...]"."""
    r = subprocess.run([str(BIN / "cdnv2-train"), *QUICK, f"hydra.run.dir={tmp_path}"],
                       preexec_fn=_file_size_limit(300 * 1024), capture_output=True, text=True,
                       timeout=600, env=command_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "could not write checkpoint" in r.stderr and "File too large" in r.stderr
    assert "ulimit -f" in r.stderr
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no partial file left
