"""`chatforge run`'s parts that need no stage to run: reading a failed command's error, the simulated user, and the
summary it writes."""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.lifecycle import STAGES, Run, Stage, error_line, first_exchange, simulated_rating


def test_a_failed_commands_error_line_is_found_among_its_progress():
    tail = "\x1b[2K⠋ reading…\r\x1b[1;31merror:\x1b[0m source 'gone': /x.jsonl does not exist\n"
    assert error_line(tail) == "source 'gone': /x.jsonl does not exist"
    assert error_line("Traceback …\nKeyError: 'messages'\n") == "KeyError: 'messages'"
    assert error_line("") == "no output"


def test_the_simulated_user_likes_short_answers_that_say_something_and_corrects_the_rest():
    reply = "Pretty good, thanks! And you?"
    assert simulated_rating("I'm doing well, thank you!", reply) == (1, None)
    assert simulated_rating("ok", reply) == (-1, reply)  # says nothing
    assert simulated_rating("word " * 100, reply) == (-1, reply)  # rambles


def test_the_first_exchange_is_the_opening_up_to_the_first_assistant_turn():
    system = {"role": "system", "content": "be kind"}
    user = {"role": "user", "content": "hi"}
    assistant = {"role": "assistant", "content": "hello!"}
    assert first_exchange([system, user, assistant, user, assistant]) == ([system, user], "hello!")
    assert first_exchange([assistant, user]) is None
    assert first_exchange([system, user]) is None


def test_summary_json_names_every_stage_and_is_written_whole(tmp_path):
    run = Run("spec.yaml", str(tmp_path), [Stage(name) for name in STAGES])
    run.stage("curate").status = "ok"
    run.stage("train").status, run.status = "out of memory", "failed at train"
    path = run.write()
    written = json.loads(Path(path).read_text())
    assert [s["name"] for s in written["stages"]] == list(STAGES)
    assert [s["status"] for s in written["stages"]] == ["ok", "out of memory", "not run", "not run", "not run"]
    assert written["status"] == "failed at train" and written["lineage"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no staging file left behind
