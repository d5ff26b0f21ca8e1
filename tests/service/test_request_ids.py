import os
import re
import uuid

from service.request_ids import new_request_id


def test_ids_are_uuid4_hex_and_distinct() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert all(uuid.UUID(hex=i).version == 4 for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_process_does_not_repeat_the_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its first ids and leave without running the test session's teardown
        os.write(write, "".join(new_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 256).decode()
    os.waitpid(pid, 0)
    parent = "".join(new_request_id() for _ in range(4))
    assert len(child) == 128
    assert not {child[i:i + 32] for i in range(0, 128, 32)} & {parent[i:i + 32] for i in range(0, 128, 32)}
