"""`tunelab label`: the labeling server over real HTTP, the labels file's crash safety, resume after SIGKILL,
leases, overlap and agreement, undo, bad requests, generation in the worker, and the labels in rm and dpo."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime

import pytest

from tests.helpers import make_tiny_model_dir, write_jsonl
from tests.labeling import (CliServer, Client, ThreadServer, candidate_session, get, read_labels, review_candidates,
                            write_candidates)
from tunelab.cli import main
from tunelab.label import LabelError
from tunelab.label.stats import cohen_kappa, format_stats, label_stats
from tunelab.label.store import LabelFile

pytest.importorskip("starlette", reason="the label extra is not installed: pip install \"tunelab[label]\"")
pytest.importorskip("uvicorn", reason="the label extra is not installed: pip install \"tunelab[label]\"")


@pytest.fixture
def candidates(tmp_path):
    return write_candidates(tmp_path / "candidates.jsonl", n=5)


def source_of(rows: list[dict], prompt: str, text: str) -> str:
    row = next(r for r in rows if r["prompt"] == prompt)
    return row["sources"][row["responses"].index(text)]


def test_labels_are_rows_for_rm_and_dpo_with_hidden_sources(tmp_path, candidates):
    output = tmp_path / "prefs.jsonl"
    rows = review_candidates(5)
    with ThreadServer(candidate_session(candidates, output)) as server:
        page = Client(server.url, labeler="alice")
        shown = []
        for choice in ("A", "B", "tie", "skip"):
            answer = page.next()
            assert answer["status"] == "item"
            assert not {"warm", "cold", "source", "sources"} & set(json.dumps(answer).replace('"', " ").split())
            pair = answer["pair"]
            shown.append(pair)
            status, saved = page.label(pair["id"], choice, comment=f"because {choice}")
            assert status == 200 and saved["status"] == "saved"
            assert saved["progress"]["labeled"] == len(shown) and saved["progress"]["total"] == 5
            assert saved["progress"]["mine"] == len(shown)
            assert read_labels(output)[-1]["id"] == saved["id"]  # on disk when acknowledged
    labels = read_labels(output)
    assert [r["choice"] for r in labels] == ["A", "B", "tie", "skip"]
    for row, pair in zip(labels, shown):
        assert row["prompt"] == pair["prompt"]
        winner, loser = (pair["b"], pair["a"]) if row["choice"] == "B" else (pair["a"], pair["b"])
        assert (row["chosen"], row["rejected"]) == (winner, loser)
        assert row["chosen_source"] == source_of(rows, row["prompt"], row["chosen"])
        assert row["rejected_source"] == source_of(rows, row["prompt"], row["rejected"])
        assert row["labeler"] == "alice" and row["comment"] == f"because {row['choice']}"
        assert datetime.fromisoformat(row["time"].replace("Z", "+00:00")).tzinfo is not None
    assert len({r["item"] for r in labels}) == 4 and len({r["id"] for r in labels}) == 4


def test_sides_are_shuffled(tmp_path):
    rows = review_candidates(40)
    candidates = write_candidates(tmp_path / "c.jsonl", rows=rows)
    session = candidate_session(candidates, tmp_path / "prefs.jsonl")
    with ThreadServer(session) as server:
        firsts = []
        for n in range(40):
            page = Client(server.url, client=f"tab{n}", token=server.app.state.token)
            pair = page.next()["pair"]
            firsts.append(source_of(rows, pair["prompt"], pair["a"]))
    assert 8 <= firsts.count("warm") <= 32  # 40 fair coin flips: outside this with odds of about 1 in 10^4


def test_bad_requests_get_a_4xx_with_a_message_and_change_nothing(tmp_path, candidates):
    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output)) as server:
        page = Client(server.url)
        pair = page.next()["pair"]
        assert page.label(pair["id"], "A")[0] == 200
        pair = page.next()["pair"]
        before = output.read_bytes()
        good = {"pair": pair["id"], "choice": "B", "labeler": "alice"}
        cases = [
            (403, page.post("/api/label", good, token=None)),
            (403, page.post("/api/label", good, token="not-the-token")),
            (403, page.post("/api/undo", {"client": page.client}, token=None)),
            (404, page.post("/api/label", {**good, "pair": "no-such-item"})),
            (400, page.post("/api/label", None, raw=b"{not json")),
            (400, page.post("/api/label", ["a", "list"])),
            (400, page.post("/api/label", {"choice": "A"})),
            (400, page.post("/api/label", {**good, "choice": "C"})),
            (400, page.post("/api/label", {**good, "comment": 7})),
            (400, page.post("/api/label", {**good, "extra": 1})),
            (400, page.post("/api/label", {**good, "labeler": "x" * 500})),
            (400, page.post("/api/next", {"labeler": "alice"})),
            (400, page.post("/api/next", {"client": "bad client id!"})),
        ]
        rebound = urllib.request.Request(server.url + "/", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # a DNS-rebinding page cannot read the token
            urllib.request.urlopen(rebound, timeout=30)
        assert refused.value.code == 400 and b"unexpected Host" in refused.value.read()
        spoofed = urllib.request.Request(server.url + "/api/label", data=json.dumps(good).encode(), method="POST",
                                         headers={"Host": "attacker.example", "X-Label-Token": page.token})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(spoofed, timeout=30)
        assert refused.value.code == 400
        for expected, (status, answer) in cases:
            assert status == expected, answer
            assert len(answer["error"]) > 10
        assert output.read_bytes() == before
        status, _, _ = get(server.url + "/api/label")
        assert status == 405
        assert page.label(pair["id"], "B")[0] == 200  # the item was still open
        assert len(read_labels(output)) == 2


def test_a_retried_label_is_saved_once(tmp_path, candidates):
    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output)) as server:
        page = Client(server.url)
        pair = page.next()["pair"]
        assert page.label(pair["id"], "A", label_id="retry-1")[1]["status"] == "saved"
        status, again = page.label(pair["id"], "A", label_id="retry-1")
        assert status == 200 and again["repeat"] is True
        status, other = page.label(pair["id"], "B")  # the same item again, without the id: already labeled
        assert status == 404, other
    assert [r["id"] for r in read_labels(output)] == ["retry-1"]


def test_two_pages_never_hold_the_same_item(tmp_path):
    candidates = write_candidates(tmp_path / "c.jsonl", n=12)
    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output)) as server:
        token = server.app.state.token
        one, two = Client(server.url, "alice", "tab-1", token), Client(server.url, "alice", "tab-2", token)
        a, b = one.next()["pair"], two.next()["pair"]
        assert a["prompt"] != b["prompt"]
        assert one.next()["pair"]["id"] == a["id"]  # asking again keeps the same item (lease renewed)
        third = Client(server.url, "bob", "tab-3", token)
        c = third.next()["pair"]
        assert c["prompt"] not in (a["prompt"], b["prompt"])
        for page, pair in ((one, a), (two, b), (third, c)):
            assert page.label(pair["id"], "A")[0] == 200

        held: dict[str, str] = {}
        clash: list[str] = []
        guard = threading.Lock()

        def work(page: Client) -> None:
            while True:
                answer = page.next()
                if answer["status"] == "done":
                    return
                if answer["status"] == "waiting":  # the items left are held by the other pages
                    time.sleep(0.02)
                    continue
                pair = answer["pair"]
                with guard:
                    if pair["prompt"] in held.values():
                        clash.append(pair["prompt"])
                    held[page.client] = pair["prompt"]
                time.sleep(0.01)
                with guard:
                    held.pop(page.client)
                status, saved = page.label(pair["id"], "B")
                assert status == 200, saved

        pages = [Client(server.url, name, f"t-{name}-{n}", token) for n, name in enumerate(["alice", "alice", "bob"])]
        threads = [threading.Thread(target=work, args=(page,)) for page in pages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not clash
    labels = read_labels(output)
    assert len(labels) == 12 and len({r["item"] for r in labels}) == 12


def test_waiting_when_every_open_item_is_held_elsewhere_and_expired_leases_come_back(tmp_path):
    candidates = write_candidates(tmp_path / "c.jsonl", n=1)
    now = [0.0]
    session = candidate_session(candidates, tmp_path / "prefs.jsonl", lease_seconds=100, clock=lambda: now[0])
    with ThreadServer(session) as server:
        token = server.app.state.token
        one, two = Client(server.url, "alice", "tab-1", token), Client(server.url, "bob", "tab-2", token)
        pair = one.next()["pair"]
        assert two.next()["status"] == "waiting"
        now[0] = 101.0  # tab-1 was closed without a word: its lease runs out
        taken = two.next()
        assert taken["status"] == "item" and taken["pair"]["prompt"] == pair["prompt"]
        assert two.label(taken["pair"]["id"], "tie")[0] == 200
        assert one.next()["status"] == "done"
        status, late = one.label(pair["id"], "A")
        assert status == 404 and "unknown item" in late["error"]
    assert len(read_labels(tmp_path / "prefs.jsonl")) == 1


def test_release_gives_the_item_back(tmp_path, candidates):
    with ThreadServer(candidate_session(candidates, tmp_path / "prefs.jsonl")) as server:
        token = server.app.state.token
        one, two = Client(server.url, "alice", "tab-1", token), Client(server.url, "bob", "tab-2", token)
        first = one.next()["pair"]
        assert one.post("/api/release", {"client": one.client})[0] == 200
        assert two.next()["pair"]["prompt"] == first["prompt"]


def test_undo_removes_the_last_label_and_shows_its_item_again(tmp_path, candidates):
    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output)) as server:
        page = Client(server.url)
        assert page.undo()[0] == 409  # nothing to undo yet
        first = page.next()["pair"]
        page.label(first["id"], "A")
        second = page.next()["pair"]
        page.label(second["id"], "B", comment="b reads better")
        shown_next = page.next()["pair"]  # the page moved on: its item goes back when it undoes
        status, answer = page.undo()
        assert status == 200 and answer["status"] == "item"
        again = answer["pair"]
        assert (again["prompt"], again["a"], again["b"]) == (second["prompt"], second["a"], second["b"])
        assert answer["undone"]["choice"] == "B" and answer["undone"]["comment"] == "b reads better"
        assert answer["progress"]["labeled"] == 1
        assert [r["prompt"] for r in read_labels(output)] == [first["prompt"]]
        other = Client(server.url, "bob", token=server.app.state.token).next()["pair"]
        assert other["prompt"] == shown_next["prompt"]  # free again
        assert page.label(again["id"], "tie")[0] == 200
        assert page.undo()[1]["pair"]["prompt"] == second["prompt"]
        assert page.undo()[1]["pair"]["prompt"] == first["prompt"]
        assert page.undo()[0] == 409
    assert read_labels(output) == []
    assert not list(tmp_path.glob(".*undo-tmp"))


def test_overlap_asks_items_of_two_labelers_and_stats_measure_agreement(tmp_path):
    rows = review_candidates(6)
    candidates = write_candidates(tmp_path / "c.jsonl", rows=rows)
    output = tmp_path / "prefs.jsonl"

    def side(pair: dict, source: str) -> str:
        return "A" if source_of(rows, pair["prompt"], pair["a"]) == source else "B"

    with ThreadServer(candidate_session(candidates, output, overlap=3)) as server:
        token = server.app.state.token
        alice, bob = Client(server.url, "alice", "a", token), Client(server.url, "bob", "b", token)
        seen = []
        while (answer := alice.next())["status"] == "item":
            seen.append(answer["pair"]["prompt"])
            alice.label(answer["pair"]["id"], side(answer["pair"], "warm"))
        assert len(seen) == 6 and len(set(seen)) == 6  # never an item twice for one labeler
        assert "3 items still need a second labeler" in answer["message"]
        assert answer["progress"] == {**answer["progress"], "labeled": 6, "total": 9}
        bob_items = []
        while (answer := bob.next())["status"] == "item":
            pair = answer["pair"]
            bob_items.append(pair["prompt"])
            bob.label(pair["id"], side(pair, "warm") if len(bob_items) < 3 else "tie")  # agrees on two of three
        assert len(bob_items) == 3 and answer["message"] == "all done: every item is labeled"
    stats = label_stats(str(output))
    assert stats["labels"] == 9 and stats["labelers"]["bob"]["ties"] == 1
    agreement = stats["agreement"]
    assert (agreement["items"], agreement["pairs"], agreement["agreed"]) == (3, 3, 2)
    assert agreement["rate"] == pytest.approx(2 / 3)
    # alice: warm better x3; bob: warm, warm, tie -> po 2/3, pe (3 * 2) / 9 = 2/3, kappa 0
    assert agreement["kappa"] == pytest.approx(0.0)
    assert stats["sources"]["warm"] == {"wins": 8, "losses": 0, "ties": 1, "win_rate": pytest.approx(8.5 / 9)}


def test_cohen_kappa_against_hand_values():
    # rater 1: A A B B, rater 2: A B B B -> po = 3/4, pe = (2*1 + 2*3)/16 = 1/2, kappa = 0.5
    assert cohen_kappa([("A", "A"), ("A", "B"), ("B", "B"), ("B", "B")]) == pytest.approx(0.5)
    assert cohen_kappa([("A", "A"), ("B", "B")]) == pytest.approx(1.0)
    assert cohen_kappa([("A", "B"), ("B", "A")]) == pytest.approx(-1.0)
    assert cohen_kappa([("A", "A"), ("A", "A")]) is None  # chance agreement is total: undefined
    assert cohen_kappa([]) is None


def labels_file(path, rows):
    base = {"labeler": "alice", "time": "2025-01-01T00:00:00.000Z", "comment": ""}
    return write_jsonl(path, [{**base, **row, "id": f"l{i}"} for i, row in enumerate(rows)])


def test_stats_counts_rates_agreement_and_wins(tmp_path, capsys):
    rows = [
        {"item": "i1", "prompt": "p1", "chosen": "x1", "rejected": "y1", "chosen_source": "m", "rejected_source": "n",
         "choice": "A"},
        {"item": "i1", "prompt": "p1", "chosen": "x1", "rejected": "y1", "chosen_source": "m", "rejected_source": "n",
         "choice": "B", "labeler": "bob", "time": "2025-01-01T00:00:01.000Z"},
        {"item": "i2", "prompt": "p2", "chosen": "y2", "rejected": "x2", "chosen_source": "n", "rejected_source": "m",
         "choice": "A"},
        {"item": "i2", "prompt": "p2", "chosen": "x2", "rejected": "y2", "chosen_source": "m", "rejected_source": "n",
         "choice": "B", "labeler": "bob", "time": "2025-01-01T00:00:01.000Z"},
        {"item": "i3", "prompt": "p3", "chosen": "x3", "rejected": "y3", "chosen_source": "m", "rejected_source": "n",
         "choice": "tie"},
        {"item": "i4", "prompt": "p4", "chosen": "x4", "rejected": "y4", "chosen_source": "m", "rejected_source": "n",
         "choice": "skip"},
        {"item": "i3", "prompt": "p3", "chosen": "x3", "rejected": "y3", "chosen_source": "m", "rejected_source": "n",
         "choice": "skip", "labeler": "bob", "time": "2025-01-01T00:00:01.000Z"},
    ]
    path = labels_file(tmp_path / "prefs.jsonl", rows)
    stats = label_stats(str(path))
    assert stats["labelers"]["alice"] == {"labels": 4, "preferred": 2, "ties": 1, "skips": 1, "tie_rate": 0.25,
                                          "skip_rate": 0.25}
    assert stats["labelers"]["bob"]["skips"] == 1
    agreement = stats["agreement"]
    # i1: both said m's response (x1) is better; i2: alice n, bob m; i3: a skip, left out
    assert (agreement["items"], agreement["pairs"], agreement["agreed"], agreement["pairs_with_skip"]) == (3, 2, 1, 1)
    assert agreement["kappa"] == pytest.approx(0.0)  # po 1/2; pe = (1*2 + 1*0)/4 = 1/2
    assert stats["sources"]["m"] == {"wins": 3, "losses": 1, "ties": 1, "win_rate": pytest.approx(3.5 / 5)}
    assert stats["sources"]["n"]["wins"] == 1
    assert main(["label", "--stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_stats(stats).strip()
    assert "Cohen's kappa 0.000" in out and "alice" in out and "25.0%" in out and "70.0%" in out


def test_preference_loaders_drop_ties_and_skips_and_count_them(tmp_path, tokenizer):
    from tunelab.config import DataConfig, DataSource
    from tunelab.data.preference import prepare_policy_pairs, prepare_preference_data

    rows = [{"prompt": "Write a review of Up.\n", "chosen": f"A superb film {i}.", "rejected": f"A dull film {i}.",
             "choice": choice, "item": f"i{i}", "chosen_source": "m", "rejected_source": "n"}
            for i, choice in enumerate(["A", "B", "tie", "skip", "skip", "A"])]
    path = labels_file(tmp_path / "prefs.jsonl", rows)
    config = DataConfig(sources=[DataSource(path=str(path))], max_length=64, eval_fraction=0.0)
    for prepare in (prepare_preference_data, prepare_policy_pairs):
        data = prepare(config, tokenizer)
        summary = data.sources[0]
        assert (summary.rows, summary.kept, summary.dropped_tie, summary.dropped_skip) == (6, 3, 1, 2)
        assert len(data.train) == 3
        assert "1 ties and 2 skips dropped" in summary.line()


def test_store_cuts_a_torn_last_line_and_locks_the_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"item": "a", "labeler": "x", "choice": "A", "id": "1"}) + "\n"
    path.write_text(good + '{"item": "b", "label')
    store = LabelFile(path)
    rows, note = store.open()
    assert [r["id"] for r in rows] == ["1"] and "cut off" in note
    assert path.read_text() == good
    with pytest.raises(LabelError, match="in use by another"):
        LabelFile(path).open()
    store.append({"id": "2"})
    store.remove("1")
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["2"]
    store.close()
    LabelFile(path).open()  # the lock went with the first store

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "not json\n" + good)
    with pytest.raises(LabelError, match="bad.jsonl line 2: malformed JSON"):
        LabelFile(bad).open()


def test_a_failed_write_is_taken_back_and_answered_with_an_error(tmp_path, candidates, monkeypatch):
    import errno
    import os

    from tunelab.label import store

    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output)) as server:
        page = Client(server.url)
        page.label(page.next()["pair"]["id"], "A")
        before = output.read_bytes()
        pair = page.next()["pair"]
        real_fsync = os.fsync

        def full_disk(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store.os, "fsync", full_disk)
        status, answer = page.label(pair["id"], "B", label_id="try-1")
        assert status == 500 and "No space left" in answer["error"]
        assert output.read_bytes() == before  # the line written before the fsync failed is cut back off
        monkeypatch.setattr(store.os, "fsync", real_fsync)
        assert page.label(pair["id"], "B", label_id="try-1")[0] == 200  # the page retries: saved once
    assert [r["choice"] for r in read_labels(output)] == ["A", "B"]


def test_resume_after_sigkill_loses_no_acknowledged_label_and_repeats_none(tmp_path):
    candidates = write_candidates(tmp_path / "c.jsonl", n=40)
    output = tmp_path / "prefs.jsonl"
    args = ["--candidates", str(candidates), "--output", str(output), "--labeler", "alice"]
    server = CliServer(args)
    acknowledged, stop = [], threading.Event()

    def label_until_the_server_dies(page: Client) -> None:
        while not stop.is_set():
            try:
                pair = page.next()["pair"]
                status, saved = page.label(pair["id"], "A")
            except (OSError, ValueError):
                return  # the server is gone
            assert status == 200
            acknowledged.append(saved["id"])

    try:
        pages = [Client(server.url, "alice", "tab-1"), Client(server.url, "bob", "tab-2")]
        threads = [threading.Thread(target=label_until_the_server_dies, args=(p,)) for p in pages]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 8:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        server.kill()  # mid-session, with requests in flight
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        server.stop()
    labels = read_labels(output)
    ids = [r["id"] for r in labels]
    assert set(acknowledged) <= set(ids)
    assert len(ids) == len(set(ids)) and len({r["item"] for r in labels}) == len(labels)

    server = CliServer(args)
    try:
        page = Client(server.url, "carol")
        answer = page.next()
        assert answer["progress"]["labeled"] == len(labels)
        resumed = []
        while answer["status"] == "item":
            resumed.append(answer["pair"]["prompt"])
            assert page.label(answer["pair"]["id"], "B")[0] == 200
            answer = page.next()
        assert answer["status"] == "done"
    finally:
        assert server.stop() == 130  # Ctrl-C
    assert any("stopped; 40 of 40 labels" in line for line in server.stderr_lines)
    final = read_labels(output)
    assert len(final) == 40 and len({r["item"] for r in final}) == 40
    assert not set(resumed) & {r["prompt"] for r in labels}
    assert [r["id"] for r in final[:len(labels)]] == ids  # the first session's rows are kept as they were


def test_generation_runs_in_the_worker_and_prepares_ahead(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write a review of Film {i}.\n"} for i in range(4)])
    output = tmp_path / "prefs.jsonl"
    server = CliServer(["--model", str(model), "--prompts", str(prompts), "--output", str(output),
                        "--temperature", "1.0", "--max-new-tokens", "12", "--seed", "3"])
    try:
        page = Client(server.url, "alice")
        first = page.next_pair()
        assert first["prompt"] == "Write a review of Film 0.\n" and first["a"] != first["b"]
        deadline = time.monotonic() + 60
        while page.next()["progress"]["prepared_ahead"] < 2:  # the next pairs, made while this one is open
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert page.label(first["id"], "B")[0] == 200
        second = page.next()
        assert second["status"] == "item"  # ready at once: it was prepared ahead
        assert page.label(second["pair"]["id"], "tie")[0] == 200
    finally:
        server.stop()
    labels = read_labels(output)
    assert {labels[0]["chosen_source"], labels[0]["rejected_source"]} == {f"{model} (sample 1)",
                                                                          f"{model} (sample 2)"}
    assert labels[0]["chosen"] == first["b"] and labels[1]["choice"] == "tie"


def test_rm_trains_on_labels_with_ties_and_skips_dropped_and_counted(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "c.jsonl", n=6)
    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output)) as server:
        page = Client(server.url)
        for choice in ("A", "B", "tie", "skip", "A", "B"):
            page.label(page.next()["pair"]["id"], choice)
    model = make_tiny_model_dir(tmp_path / "model")
    code = main(["rm", "--model", str(model), "--data", str(output), "--output", str(tmp_path / "rm"), "--max-steps",
                 "2", "--batch-size", "2", "--peft", "none", "--quiet", "train.report=false"])
    assert code == 0
    err = capsys.readouterr().err
    assert "6 rows, 4 kept" in err and "1 ties and 1 skips dropped" in err
    assert (tmp_path / "rm" / "final" / "config.json").is_file()


def test_cli_refuses_bad_options_with_a_message(tmp_path, capsys, candidates, monkeypatch):
    output = str(tmp_path / "prefs.jsonl")
    cases = [
        (["label", "--candidates", str(candidates)], "--output is required"),
        (["label", "--candidates", str(candidates), "--model", "m", "--output", output], "either --model"),
        (["label", "--output", output], "either --model"),
        (["label", "--model", "m", "--output", output], "--model needs --prompts"),
        (["label", "--model", "m", "--prompts", "p", "--output", output], "--temperature above 0"),
        (["label", "--candidates", str(candidates), "--output", output, "--overlap", "-1"], "--overlap"),
        (["label", "--stats", str(tmp_path / "none.jsonl")], "labels file not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["only one"]}])
    assert main(["label", "--candidates", str(bad), "--output", output]) == 2
    assert "bad.jsonl line 1: field 'responses' must be a list of at least 2 strings" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if the extra were not installed
    assert main(["label", "--candidates", str(candidates), "--output", output]) == 2
    assert 'pip install "tunelab[label]"' in capsys.readouterr().err


def test_candidates_with_more_responses_and_a_prompts_subset(tmp_path):
    from tunelab.label.items import load_candidates

    rows = [{"prompt": f"p{i}", "responses": [f"r{i}-{j}" for j in range(4)]} for i in range(6)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    items, pairs = load_candidates(str(path), seed=1)
    again_items, again = load_candidates(str(path), seed=1)
    assert pairs == again  # every labeler of an item sees the same two responses
    picked = {(p.first.source, p.second.source) for p in pairs.values()}
    assert len(picked) > 1 and all(a != b for a, b in picked)
    assert all(s.startswith("c.jsonl[") for pair in picked for s in pair)
    subset, _ = load_candidates(str(path), only=["p4", "p1"])
    assert [item.prompt for item in subset] == ["p4", "p1"]
    assert {i.key for i in subset} <= {i.key for i in items}
    with pytest.raises(LabelError, match="1 of the 2 prompts have no row"):
        load_candidates(str(path), only=["p1", "nope"])


def test_page_headers_assets_and_guidelines_are_safe(tmp_path, candidates):
    session = candidate_session(candidates, tmp_path / "prefs.jsonl")
    guidelines = "# Rules\n\n<script>alert(1)</script> <img src=x onerror=alert(2)>\n\n[click](javascript:alert(3))"
    with ThreadServer(session, guidelines=guidelines) as server:
        status, headers, body = get(server.url + "/")
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
        assert "<script>" not in body.decode().split("</head>")[1]  # the page itself holds no inline script
        for asset in ("app.js", "style.css"):
            status, _, content = get(f"{server.url}/assets/{asset}")
            assert status == 200 and content
        assert b"innerHTML = state.guidelines_html" in get(server.url + "/assets/app.js")[2]
        assert b".innerHTML" not in get(server.url + "/assets/app.js")[2].replace(
            b"innerHTML = state.guidelines_html", b"")  # only the server-rendered guidelines use innerHTML
        state = json.loads(get(server.url + "/api/state")[2])
        rendered = state["guidelines_html"]
        assert "<h1>Rules</h1>" in rendered and "&lt;script&gt;" in rendered and "<script" not in rendered
        assert "<img" not in rendered and 'href="javascript:' not in rendered
