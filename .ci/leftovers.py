"""Fail if any process started under `make test` (every one carries RAYBIG_TEST_MARK=<mark> in its
environment, Ray's GCS, raylet and workers included) is still alive 30 s after the tests ended; list
and end them. Usage: python3 .ci/leftovers.py MARK"""
import os
import signal
import sys
import time


def marked(needle: bytes) -> dict[int, str]:
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie holds nothing; its parent reaps it
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            continue
    return found


def main(mark: str) -> int:
    needle = f"RAYBIG_TEST_MARK={mark}".encode()
    deadline = time.monotonic() + 30
    left = marked(needle)
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = marked(needle)
    if not left:
        print("leftovers: no process of the tests is running")
        return 0
    print(f"leftovers: {len(left)} process(es) of the tests still running 30 s after them:")
    for pid, cmd in sorted(left.items()):
        print(f"  {pid} {cmd}")
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
