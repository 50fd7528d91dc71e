"""The gateway stops on signals sent to it, and only on those.

Regression: pyroute2 forks a child per namespace operation and ends it with SIGTERM;
the child inherited the loop's signal wakeup fd, so the gateway shut itself down while
creating a sandbox (seen as "received SIGTERM" under parallel test load).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent("""
    import asyncio, os, signal, time
    import uvloop
    from sandport.cli import install_stop_signals

    async def main():
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        install_stop_signals(loop, stopped.set)

        def fork_and_terminate_child():
            pid = os.fork()
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            time.sleep(0.2)  # the child is alive when the signal arrives
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)

        for _ in range(3):
            await asyncio.to_thread(fork_and_terminate_child)
        await asyncio.sleep(0.3)
        print("after child SIGTERM:", "stopped" if stopped.is_set() else "running")
        os.kill(os.getpid(), signal.SIGTERM)  # positive control: our own signal stops us
        await asyncio.wait_for(stopped.wait(), 5)
        print("after own SIGTERM: stopped")

    uvloop.run(main())
""")


def test_a_signal_to_a_forked_child_does_not_stop_the_gateway() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "after child SIGTERM: running" in r.stdout, r.stdout + r.stderr
    assert "after own SIGTERM: stopped" in r.stdout
