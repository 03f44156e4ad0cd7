"""`slm serve` keeps instances warm (issue 18, point 5): an instance that answered cleanly answers
the next request, with the tokenizer, template and grammar caches it built. A warm instance must
answer exactly like a fresh one, and one whose request failed must not be reused."""
from __future__ import annotations

import json
import time

from conftest import ROOT
from test_http import _raw
from test_limits import _chat, _metric, serving, tiny_models  # noqa: F401 (a fixture)

MODEL = "smollm2-135m-instruct"

# Requests that exercise what an instance keeps between requests: the parsed tokenizer and chat
# template, the grammar's token trie, seeded sampling, logprobs; and a refused request between them.
REQUESTS = [
    {"messages": [{"role": "user", "content": "Give me three words about the sea."}], "max_tokens": 12,
     "temperature": 0},
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": -1},  # refused: 400
    {"messages": [{"role": "user", "content": "Describe a cat as JSON."}], "max_tokens": 24, "temperature": 0,
     "response_format": {"type": "json_object"}},
    {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12, "temperature": 0.9,
     "seed": 7},
    {"messages": [{"role": "user", "content": "Give me three words about the sea."}], "max_tokens": 4,
     "temperature": 0, "logprobs": True, "top_logprobs": 2},
]


def _answers(url: str) -> list:
    answers = []
    for request in REQUESTS:
        status, _, raw = _raw(url, "POST", "/v1/chat/completions", json.dumps({"model": MODEL, **request}).encode())
        body = json.loads(raw)
        if status != 200:
            answers.append((status, body["error"]["param"]))
            continue
        choice = body["choices"][0]
        answers.append((status, choice["message"]["content"], choice.get("logprobs"), body["usage"]))
    return answers


def test_a_warm_instance_answers_like_a_fresh_one(tmp_path):
    models = ROOT / "models"
    (tmp_path / "fresh").mkdir()
    (tmp_path / "warm").mkdir()
    with serving(models, tmp_path / "fresh", "--instance-reuse", "1", "--prefix-cache-mb", "0") as (url, _, _):
        before = _metric(url, "slm_instances_started_total")  # /health, polled at start, runs one too
        fresh = _answers(url)
        assert _metric(url, "slm_instances_started_total") - before == len(REQUESTS)
        assert _metric(url, "slm_instances_idle") == 0
    with serving(models, tmp_path / "warm", "--prefix-cache-mb", "0") as (url, _, _):
        warm = _answers(url)
        # Twice over: the second round runs on an instance that has answered them all before.
        again = _answers(url)
        assert _metric(url, "slm_instances_started_total") == 1  # the one /health started
        assert _metric(url, "slm_instances_idle") == 1
    assert [a[0] for a in fresh] == [200, 400, 200, 200, 200], fresh
    assert fresh[1][1] == "temperature"
    assert fresh[2][1].lstrip().startswith("{"), fresh[2]  # the grammar held (24 tokens may cut it)
    assert warm == fresh
    assert again == fresh


def test_a_request_that_failed_leaves_its_instance_behind(tmp_path):
    """An instance stopped at the deadline is in an unknown state: it is dropped, not reused."""
    with serving(ROOT / "models", tmp_path, "--request-timeout", "2") as (url, _, _):
        status, _, raw = _chat(url, MODEL, "Hi", max_tokens=2)
        assert status == 200, raw
        assert _metric(url, "slm_instances_started_total") == 1
        body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000})
        status, _, raw = _raw(url, "POST", "/v1/completions", body.encode())
        assert status == 503, raw  # it ran on the warm instance, which is now gone
        assert _metric(url, "slm_instances_idle") == 0
        status, _, raw = _chat(url, MODEL, "Hi", max_tokens=2)
        assert status == 200, raw
        assert _metric(url, "slm_instances_started_total") == 2


def test_idle_instances_are_freed(tmp_path, tiny_models):  # noqa: F811 (the fixture)
    with serving(tiny_models, tmp_path, "--instance-idle-timeout", "1") as (url, _, _):
        assert _chat(url, "tiny", max_tokens=2)[0] == 200
        assert _metric(url, "slm_instances_idle") == 1
        deadline = time.time() + 10
        while _metric(url, "slm_instances_idle") != 0:  # the sweep runs every second
            assert time.time() < deadline, "the idle instance was kept past its timeout"
            time.sleep(0.2)
        assert _chat(url, "tiny", max_tokens=2)[0] == 200
        assert _metric(url, "slm_instances_started_total") == 2


def test_concurrent_requests_get_their_own_instances(tmp_path, tiny_models):  # noqa: F811
    """Two requests at once never share an instance; both instances are kept for later."""
    import concurrent.futures

    with serving(tiny_models, tmp_path, "--max-running", "2") as (url, _, _):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: _chat(url, "tiny", "Hello there", max_tokens=48), range(2)))
        assert [r[0] for r in results] == [200, 200]
        assert results[0][2]["choices"][0]["message"] == results[1][2]["choices"][0]["message"]
        started = _metric(url, "slm_instances_started_total")
        assert started in (1, 2)  # 1 when the first finished before the second arrived
        assert _metric(url, "slm_instances_idle") == started


def test_warm_up_before_the_first_request(tmp_path, tiny_models):  # noqa: F811
    """The server runs one completion on the default model before it takes requests, so the first
    request finds the model loaded and a warm instance; the warm-up is logged, not counted."""
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    with serving(tiny_models, tmp_path / "on") as (url, _, log):
        text = log.read_text()
        assert text.index("POST /v1/completions (warm-up) 200 tokens") < text.index("serving ")
        metrics = _raw(url, "GET", "/metrics")[2].decode()
        assert "slm_generation_tokens_total" not in metrics and "/v1/completions" not in metrics
        assert _metric(url, "slm_instances_started_total") == 1
        assert _chat(url, "tiny", max_tokens=2)[0] == 200
        assert _metric(url, "slm_instances_started_total") == 1
    with serving(tiny_models, tmp_path / "off", "--no-warmup") as (url, _, log):
        assert "warm-up" not in log.read_text()
