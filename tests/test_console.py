"""The console driver: matching through escape sequences and interleaved kernel messages,
never on the echoed command line, with a deadline that names what it waited for."""

from __future__ import annotations

import re
import socket
import threading

import pytest

from kmodtest.guest.console import Console, ConsoleError
from kmodtest.guest.openwrt import PRESS_ENTER, SHELL_PROMPT


def console(tmp_path, text: bytes, alive: bool = True) -> Console:
    log = tmp_path / "console.log"
    log.write_bytes(text)
    return Console(tmp_path / "console.sock", log, lambda: alive)


def test_prompt_and_answers_found_between_kernel_messages(tmp_path):
    text = (
        b"[    4.21] procd: - early -\r\n"
        b"Please press Enter to activate this console.\r\n"
        b"[    5.23] procd: - init complete -\r\n\r\n"
        b"BusyBox v1.36.1 built-in shell (ash)\r\n\r\n"
        b"\x1b[0mroot@OpenWrt:~# \x1b[6n[    5.66] br-lan: port 1(eth0) forwarding\r\n"
        b"echo KT_$((20+22))\r\n[    6.01] random: crng init done\r\nKT_42\r\nroot@OpenWrt:~# "
    )
    c = console(tmp_path, text)
    c.expect(re.escape(PRESS_ENTER), 1, "the login prompt")
    c.expect(SHELL_PROMPT, 1, "the ash prompt")
    assert c.expect(r"KT_42", 1, "an answer").group(0) == "KT_42"
    assert "\x1b" not in c.text and "\r" not in c.text


def test_echoed_command_line_is_not_an_answer(tmp_path):
    c = console(tmp_path, b"root@OpenWrt:~# echo KT_$((20+22))\r\n")
    with pytest.raises(ConsoleError) as err:
        c.expect(r"KT_42", 0.2, "the shell's answer to a first command")
    message = str(err.value)
    assert "no the shell's answer to a first command on the console within 0 s" in message
    assert "last console lines:" in message and "echo KT_$((20+22))" in message


def test_escape_sequence_split_across_reads_is_kept_whole(tmp_path):
    c = console(tmp_path, b"root@OpenWrt:~# \x1b[")
    with pytest.raises(ConsoleError):
        c.expect(r"KT_7", 0.1, "x")
    with open(tmp_path / "console.log", "ab") as log:
        log.write(b"6nKT_7\r\n")
    c.expect(r"KT_7", 1, "x")
    assert "[6n" not in c.text


def test_dead_qemu_is_reported_at_once(tmp_path):
    c = console(tmp_path, b"[    0.00] Linux version\r\n", alive=False)
    with pytest.raises(ConsoleError, match="QEMU exited while waiting for the login prompt"):
        c.expect(re.escape(PRESS_ENTER), 60, "the login prompt")


def test_typed_lines_reach_the_socket_with_a_carriage_return(tmp_path):
    path = tmp_path / "c.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = server.accept()
        conn.sendall(b"output QEMU must not wait on\n")
        got.append(conn.recv(100))
        conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    (tmp_path / "console.log").write_bytes(b"x\n")
    c = Console(path, tmp_path / "console.log", lambda: True)
    c.connect(timeout=5)
    c.line("echo hi")
    thread.join(5)
    c.expect("x", 1, "x")  # drains the socket without blocking
    c.close()
    server.close()
    assert got == [b"echo hi\r"]
