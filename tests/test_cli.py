"""The `tuili` command as a user runs it."""

import subprocess
import sys


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "tuili", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_generate_streams_text():
    r = run("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0",
            "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "KV cache:" in r.stderr and "tokens" in r.stderr  # capacity is logged at start


def test_chat_answers_each_line_and_keeps_history():
    r = run("chat", "--temperature", "0", "--max-tokens", "30", "--dtype", "float32",
            stdin="What is the capital of France?\n/reset\nWhat is the capital of Germany?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout


def test_bad_option_is_a_clear_error():
    r = run("generate", "hi", "--block-size", "3")
    assert r.returncode != 0
    assert "block_size: got 3, must be a power of two" in r.stderr
    r = run("generate", "hi", "--model", "/no/such.gguf")
    assert r.returncode != 0 and "no such model file or folder: /no/such.gguf" in r.stderr
