"""The LiteLLM guardrail against the real ``litellm`` package: calls through ``litellm.acompletion``
to a fake OpenAI-compatible LLM served on loopback (or LiteLLM's own ``mock_response``), blocking
and passing, the response check, failing closed, a real ``guardmerge serve`` as the backend,
configuration errors, and the README example.

Tiny random models give near-random scores, so thresholds force the outcome: 0.0 flags every
text, ``"off"`` never flags.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml

from guardmerge.errors import GuardmergeError, NonFiniteWeightsError
from tests.builders import MERGED_TASKS, TEXTS
from tests.serve.conftest import TwoHeads, free_port, running

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM fetches its price list at import otherwise
litellm = pytest.importorskip("litellm")
pytest.importorskip("fastapi")  # the fake LLM and guardmerge serve (extra serve)
pytest.importorskip("uvicorn")

from litellm.exceptions import GuardrailRaisedException  # noqa: E402
from litellm.types.guardrails import GuardrailEventHooks, LitellmParams  # noqa: E402

from guardmerge.integrations.litellm import (  # noqa: E402
    GuardmergeBlocked,
    GuardmergeGuardrail,
    GuardmergeGuardrailError,
    GuardmergeUnavailable,
    Text,
    request_texts,
    response_texts,
    split_text,
    stream_texts,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")  # pydantic, on LiteLLM's types

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ALL_OFF = dict.fromkeys(MERGED_TASKS, "off")
ANSWER = "The capital of France is Paris."
BLOCKED = r"guardmerge blocked the {what}: head '{task}' flagged label '{label}' \(score \d\.\d\d\) in {where}"


# -- fixtures: an event loop, a fake LLM, guardrails registered with LiteLLM ---------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module (LiteLLM caches its HTTP clients per loop)."""
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)  # LiteLLM's logging worker

    async def cancel() -> None:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    loop.run_until_complete(cancel())
    loop.close()


@pytest.fixture(scope="module")
def llm() -> Iterator[dict[str, Any]]:
    """A fake OpenAI-compatible chat endpoint on loopback: ``{"url", "calls"}``; each call's
    body is appended to ``calls`` and answered with :data:`ANSWER`."""
    from fastapi import FastAPI

    calls: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(body)
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }

    with running(app) as url:
        yield {"url": url, "calls": calls}


@pytest.fixture
def guard() -> Iterator[Callable[..., GuardmergeGuardrail]]:
    """``guard(**params)``: a guardrail named ``gm``, the one registered with LiteLLM (the previous
    one is unregistered; all are closed after the test)."""
    made: list[GuardmergeGuardrail] = []

    def make(**params: Any) -> GuardmergeGuardrail:
        g = GuardmergeGuardrail(**{"guardrail_name": "gm", **params})
        for old in made:
            litellm.logging_callback_manager.remove_callback_from_all_lists(old)
        made.append(g)
        litellm.logging_callback_manager.add_litellm_callback(g)
        return g

    yield make
    for g in made:
        litellm.logging_callback_manager.remove_callback_from_all_lists(g)
        g.close()


def ask(
    loop: asyncio.AbstractEventLoop, llm: dict[str, Any], messages: Sequence[dict[str, Any]] | str, **kw: Any
) -> Any:
    """``litellm.acompletion`` to the fake LLM, naming the guardrail ``gm``; the answer's text."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    call = litellm.acompletion(
        model="openai/fake-model",
        api_base=llm["url"] + "/v1",
        api_key="sk-test",
        messages=list(messages),
        guardrails=["gm"],
        **kw,
    )
    return loop.run_until_complete(call).choices[0].message.content


def run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> Any:
    return loop.run_until_complete(coroutine)


# -- blocking and passing through the real litellm.acompletion --------------------------------------------


def test_flagged_prompt_is_blocked_naming_head_and_label(loop, llm, guard, merged_model) -> None:
    guard(model=merged_model, thresholds={**ALL_OFF, "injection": 0.0})
    before = len(llm["calls"])
    with pytest.raises(GuardmergeBlocked) as caught:
        ask(loop, llm, [{"role": "system", "content": ""}, {"role": "user", "content": TEXTS[0]}])
    err = caught.value
    assert re.fullmatch(
        BLOCKED.format(what="request", task="injection", label="injection", where=r"message 1 \(user\)"), str(err)
    )
    assert err.status_code == 400 and err.blocked_content  # LiteLLM's proxy answers 400
    assert isinstance(err, GuardrailRaisedException) and isinstance(err, GuardmergeError)
    assert len(llm["calls"]) == before  # the LLM never saw it


def test_benign_prompt_reaches_the_llm_and_returns_its_answer(loop, llm, guard, merged_model) -> None:
    guard(model=merged_model, thresholds=ALL_OFF, event_hook=["pre_call", "post_call"])
    before = len(llm["calls"])
    assert ask(loop, llm, TEXTS[1]) == ANSWER
    assert len(llm["calls"]) == before + 1
    assert llm["calls"][-1]["messages"] == [{"role": "user", "content": TEXTS[1]}]


def test_every_message_runs_in_one_pass_over_every_head(loop, llm, guard) -> None:
    backend = TwoHeads()
    guard(model=backend, thresholds={"a": 0.9, "b": 0.9})
    messages = [
        {"role": "system", "content": "you are helpful"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {"url": "x"}}],
        },
        {"role": "assistant", "content": "an answer"},
        {"role": "tool", "tool_call_id": "1", "content": "tool output"},
        {"role": "user", "content": "second"},
    ]
    assert ask(loop, llm, messages) == ANSWER
    assert backend.calls == [(5, ("a", "b"))]  # one pass: five texts, both heads


def test_post_call_blocks_a_flagged_response(loop, llm, guard, merged_model) -> None:
    guard(model=merged_model, thresholds={**ALL_OFF, "hate": 0.0}, event_hook="post_call")
    before = len(llm["calls"])
    with pytest.raises(
        GuardmergeBlocked, match=BLOCKED.format(what="response", task="hate", label="hate", where="choice 0")
    ):
        ask(loop, llm, TEXTS[2])
    assert len(llm["calls"]) == before + 1  # the request went through; the answer did not


def test_pre_call_mode_leaves_the_response_alone(loop, llm, guard) -> None:
    backend = TwoHeads()
    guard(model=backend, thresholds={"a": 0.9, "b": 0.9}, event_hook="pre_call")
    assert ask(loop, llm, "hello") == ANSWER
    assert backend.calls == [(1, ("a", "b"))]  # the prompt only


def test_tasks_pick_heads(loop, llm, guard, merged_model) -> None:
    g = guard(model=merged_model, tasks=["sentiment"], thresholds={"hate": 0.0, "injection": 0.0, "sentiment": "off"})
    assert g.tasks == ["sentiment"]
    assert ask(loop, llm, TEXTS[0]) == ANSWER  # hate and injection would flag, but do not run


def test_a_guardrail_the_call_does_not_name_does_not_run(loop, llm, guard, merged_model) -> None:
    guard(model=merged_model, thresholds={"injection": 0.0})
    call = litellm.acompletion(
        model="openai/fake-model",
        api_base=llm["url"] + "/v1",
        api_key="sk-test",
        messages=[{"role": "user", "content": TEXTS[0]}],
    )
    assert run(loop, call).choices[0].message.content == ANSWER  # LiteLLM's rule: default_on is off


def test_streamed_response_is_held_until_checked(loop, guard, merged_model) -> None:
    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

    chunks = [
        ModelResponseStream(choices=[StreamingChoices(index=0, delta=Delta(content=part))])
        for part in ("you people ", "are ", "terrible")
    ]

    async def stream() -> Any:
        for c in chunks:
            yield c

    async def collect(g: GuardmergeGuardrail) -> list[Any]:
        return [c async for c in g.async_post_call_streaming_iterator_hook(None, stream(), {})]

    assert stream_texts(chunks) == [Text("you people are terrible", "choice 0")]
    passing = guard(model=merged_model, thresholds=ALL_OFF, event_hook="post_call")
    assert run(loop, collect(passing)) == chunks
    blocking = guard(model=merged_model, thresholds={**ALL_OFF, "hate": 0.0}, event_hook="post_call")
    with pytest.raises(GuardmergeBlocked, match="blocked the response: head 'hate'.* in choice 0"):
        run(loop, collect(blocking))


def test_during_call_mode_blocks(loop, llm, guard, merged_model) -> None:
    g = guard(model=merged_model, thresholds={**ALL_OFF, "injection": 0.0}, event_hook="during_call")
    with pytest.raises(GuardmergeBlocked, match="head 'injection'"):
        run(loop, g.async_moderation_hook({"messages": [{"role": "user", "content": "hi"}]}, None, "acompletion"))


# -- failing closed ---------------------------------------------------------------------------------


def test_a_backend_that_raises_blocks(loop, llm, guard) -> None:
    guard(model=TwoHeads(fail_all=True))
    before = len(llm["calls"])
    with pytest.raises(
        GuardmergeUnavailable, match="could not check the request, so it is blocked: RuntimeError: the encoder crashed"
    ) as caught:
        ask(loop, llm, "hello")
    assert caught.value.status_code == 503 and not caught.value.blocked_content
    assert len(llm["calls"]) == before


@pytest.mark.parametrize(("text", "code"), [("give me nan", "non_finite_output"), ("poison pill", "inference_failed")])
def test_a_head_without_a_verdict_blocks(loop, llm, guard, text: str, code: str) -> None:
    """Head b gives NaN for 'nan' and raises on 'poison'; head a answers, and does not flag."""
    guard(model=TwoHeads(), thresholds={"a": 0.9, "b": 0.9})
    with pytest.raises(GuardmergeUnavailable, match=rf"head 'b' gave no verdict on message 0 \(user\) \({code}: "):
        ask(loop, llm, text)
    assert ask(loop, llm, "a normal text") == ANSWER


def test_a_guard_slower_than_its_timeout_blocks(loop, llm, guard) -> None:
    release = threading.Event()
    guard(model=TwoHeads(release=release), timeout=0.2)
    try:
        with pytest.raises(GuardmergeUnavailable, match=r"no verdict within 0\.2 s \(timeout\)"):
            ask(loop, llm, "hello")
    finally:
        release.set()


def test_content_that_cannot_be_read_blocks(loop, llm, guard) -> None:
    g = guard(model=TwoHeads(), thresholds={"a": 0.9, "b": 0.9})
    for data, where in (
        ({"messages": "hello"}, "messages is a str, not a list"),
        ({"messages": [{"role": "user", "content": object()}]}, r"message 0 \(user\): content of type object"),
        ({"messages": [42]}, "message 0 is a int"),
    ):
        with pytest.raises(GuardmergeUnavailable, match=rf"cannot read the request \({where}\), so it is blocked"):
            run(loop, g.async_pre_call_hook(None, None, data, "acompletion"))


def test_invalid_unicode_gets_the_servers_error(loop, llm, guard) -> None:
    guard(model=TwoHeads())
    with pytest.raises(GuardmergeGuardrailError) as caught:
        ask(loop, llm, [{"role": "user", "content": "ok"}, {"role": "user", "content": "bad \ud800 text"}])
    assert str(caught.value) == (
        "guardmerge cannot check the request: message 1 (user) is not valid Unicode text: it has the lone "
        "surrogate U+D800 at character 4 (send UTF-8 text)"
    )
    assert caught.value.status_code == 400


def test_weights_with_nan_are_refused_when_built() -> None:
    backend = TwoHeads()
    backend.bad_weights = ["encoder.layer.0.weight"]
    with pytest.raises(NonFiniteWeightsError, match="NaN or infinity in 1 tensor"):
        GuardmergeGuardrail(model=backend)


def test_an_onnx_export_gives_the_torch_verdicts(loop, llm, guard, merged_model, onnx_dir: Path) -> None:
    torch_guard = guard(model=merged_model)
    here = run(loop, torch_guard._checker.classify(TEXTS))
    onnx_guard = guard(model=str(onnx_dir), backend="onnx", thresholds={**ALL_OFF, "injection": 0.0})
    assert onnx_guard._checker.name == "onnx backend"
    with pytest.raises(GuardmergeBlocked, match="head 'injection'"):
        ask(loop, llm, TEXTS[0])
    onnx_guard = guard(model=str(onnx_dir), backend="onnx")
    there = run(loop, onnx_guard._checker.classify(TEXTS))
    for a, b in zip(here, there):
        assert {t: h.flagged for t, h in a.heads.items()} == {t: h.flagged for t, h in b.heads.items()}


# -- long texts ---------------------------------------------------------------------------------------


class Reader:
    """One head, 'evil': flags a text whose first ``reads`` characters hold 'EVIL', and reports the
    text as cut (``truncated``) beyond them, as a tokenizer at its limit does."""

    name = "stub"
    tasks: ClassVar[list[str]] = ["evil"]
    info: ClassVar[dict[str, Any]] = {}

    def __init__(self, reads: int) -> None:
        self.reads = reads
        self.passes: list[list[str]] = []

    def labels(self, task: str) -> list[str]:
        return ["benign", "evil"]

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        return [len(t) > self.reads for t in texts]

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.passes.append(list(texts))
        hit = np.array([[0.0, 9.0] if "EVIL" in t[: self.reads] else [9.0, 0.0] for t in texts], dtype=np.float32)
        return {"evil": hit}

    def close(self) -> None:
        pass


def test_a_long_text_is_checked_to_its_end(loop, llm, guard) -> None:
    reader = Reader(reads=300)
    guard(model=reader)
    text = "word " * 900 + "EVIL"  # 4,504 characters: windows of 1,000, each halved until 300 fit
    with pytest.raises(GuardmergeBlocked, match=r"head 'evil' flagged label 'evil' \(score 1\.00\) in message 0"):
        ask(loop, llm, text)
    assert ask(loop, llm, "word " * 900) == ANSWER
    assert max(len(t) for t in reader.passes[-1]) <= 300  # the last pass read every window whole
    assert len(reader.passes) == 8  # four rounds each: 1,000 -> 550 -> 343 -> 213 characters


def test_split_text_covers_the_text_with_overlap() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(2500))
    windows = split_text(text, 1000, overlap=100)
    assert [len(w) for w in windows] == [1000, 1000, 700]
    assert windows[0][-100:] == windows[1][:100]
    assert "".join(w if i == 0 else w[100:] for i, w in enumerate(windows)) == text
    assert split_text("short", 1000) == ["short"]


def test_a_real_tokenizer_sees_every_window_whole(loop, llm, guard, merged_model) -> None:
    g = guard(model=merged_model, thresholds=ALL_OFF)
    backend = g._checker.runner.backend
    long = " ".join(["hello"] * 300)  # ~300 tokens: the tiny model reads 64
    assert backend.truncated([long]) == [True]
    seen: list[str] = []
    original = backend.logits

    def logits(texts: Sequence[str], tasks: Sequence[str] | None = None) -> Any:
        seen.extend(texts)
        return original(texts, tasks)

    backend.logits = logits
    assert ask(loop, llm, long) == ANSWER
    assert seen and not any(backend.truncated(seen[-4:]))


# -- a running guardmerge serve as the backend -----------------------------------------------------------


@pytest.fixture
def serve() -> Callable[..., Any]:
    """``with serve(model, **settings) as url``: a real guardmerge serve in a thread."""
    from guardmerge.serve import ServeSettings, create_app

    return lambda model, **settings: running(create_app(model, ServeSettings(**settings)))


def test_url_mode_blocks_and_passes_by_the_servers_thresholds(loop, llm, guard, serve, merged_model) -> None:
    flag_injection = {"hate": None, "sentiment": None, "injection": 0.0}
    with serve(merged_model, thresholds=flag_injection, api_key="secret") as url:
        guard(api_base=url, api_key="secret")
        with pytest.raises(GuardmergeBlocked) as caught:
            ask(loop, llm, TEXTS[0])
        assert re.fullmatch(
            BLOCKED.format(what="request", task="injection", label="injection", where=r"message 0 \(user\)"),
            str(caught.value),
        )
    with serve(merged_model, thresholds=dict.fromkeys(MERGED_TASKS)) as url:
        guard(api_base=url + "/")
        assert ask(loop, llm, TEXTS[0]) == ANSWER


def test_url_mode_gives_the_local_models_verdicts(loop, guard, serve, merged_model) -> None:
    local = guard(model=merged_model)
    with serve(merged_model) as url:
        remote = guard(api_base=url)
        run(loop, remote._checker.ready())
        here = run(loop, local._checker.classify(TEXTS))
        there = run(loop, remote._checker.classify(TEXTS))
    assert [r.flagged for r in here] == [r.flagged for r in there]
    for a, b in zip(here, there):
        for task in MERGED_TASKS:
            assert a.heads[task].flagged == b.heads[task].flagged
            assert a.heads[task].probabilities == pytest.approx(b.heads[task].probabilities, abs=1e-5)


def test_url_mode_fails_closed(loop, llm, guard, serve) -> None:
    before = len(llm["calls"])
    guard(api_base=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(
        GuardmergeUnavailable,
        match=r"so it is blocked: cannot reach guardmerge serve at http://127\.0\.0\.1:\d+ \(ConnectError",
    ):
        ask(loop, llm, "hello")
    with serve(TwoHeads(fail_all=True)) as url:
        guard(api_base=url)
        with pytest.raises(GuardmergeUnavailable, match=r"answered 500 \(inference_failed: "):
            ask(loop, llm, "hello")
    with serve(TwoHeads(), thresholds={"a": 0.9, "b": 0.9}, api_key="secret") as url:
        guard(api_base=url, api_key="secret")
        with pytest.raises(
            GuardmergeUnavailable, match=r"head 'b' gave no verdict on message 0 \(user\) \(non_finite_output"
        ):
            ask(loop, llm, "nan please")
        guard(api_base=url, api_key="wrong")
        with pytest.raises(GuardmergeUnavailable, match=r"answered 401 \(unauthorized: "):
            ask(loop, llm, "hello")
    assert len(llm["calls"]) == before


def test_url_mode_refuses_malformed_answers(loop, guard, serve, merged_model, monkeypatch) -> None:
    with serve(merged_model) as url:
        g = guard(api_base=url)
        data = {"messages": [{"role": "user", "content": "hi"}]}
        run(loop, g.async_pre_call_hook(None, None, data, "acompletion"))  # reads /v1/model
        checker = g._checker
        for body, why in (
            (
                {"tasks": list(MERGED_TASKS), "results": "nope"},
                r"malformed body \(results: Input should be a valid list\)",
            ),
            ({"tasks": list(MERGED_TASKS), "results": []}, "answered 0 results for 1 texts"),
            ({"tasks": ["hate"], "results": [{"flagged": False, "truncated": False, "heads": {}}]}, "without head"),
            ([1, 2], r"malformed body"),
        ):

            async def answer(method: str, path: str, payload: Any = None, body: Any = body) -> Any:
                return body

            monkeypatch.setattr(checker, "_call", answer)
            with pytest.raises(GuardmergeUnavailable, match=why):
                run(loop, g.async_pre_call_hook(None, None, data, "acompletion"))


def test_url_mode_refuses_heads_the_server_lacks(loop, guard, serve, merged_model) -> None:
    with serve(merged_model) as url:
        g = guard(api_base=url, tasks=["injection", "toxicity"])
        with pytest.raises(
            GuardmergeUnavailable,
            match=r"tasks: unknown task\(s\) 'toxicity'; the model served at .* has: hate, injection, sentiment",
        ):
            run(loop, g.async_pre_call_hook(None, None, {"prompt": "hi"}, "atext_completion"))


# -- texts of requests and answers -------------------------------------------------------------------------


def test_request_texts_of_every_kind_of_request() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
            {"role": "user", "content": [{"type": "tool_result", "content": [{"type": "text", "text": "nested"}]}]},
        ]
    }
    assert request_texts(chat) == [Text("sys", "message 0 (system)"), Text("nested", "message 3 (user)")]
    anthropic = {"system": [{"type": "text", "text": "be brief"}], "messages": [{"role": "user", "content": "q"}]}
    assert [t.text for t in request_texts(anthropic)] == ["be brief", "q"]
    responses = {
        "instructions": "rules",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call_output", "output": "42"},
        ],
    }
    assert [(t.text, t.where) for t in request_texts(responses)] == [
        ("rules", "instructions"),
        ("hi", "input"),
        ("42", "input"),
    ]
    assert [t.text for t in request_texts({"input": ["a", "b"], "model": "embed"})] == ["a", "b"]
    assert request_texts({"input": [[1, 2, 3]]}) == []  # token ids: no text
    assert [t.text for t in request_texts({"prompt": "once upon"})] == ["once upon"]
    message = litellm.Message(role="user", content="as an object")
    assert [t.text for t in request_texts({"messages": [message]})] == ["as an object"]


def test_response_texts_of_litellm_answers() -> None:
    chat = litellm.ModelResponse(choices=[{"index": 0, "message": {"role": "assistant", "content": "hello"}}])
    assert response_texts(chat) == [Text("hello", "choice 0")]
    embeddings = litellm.EmbeddingResponse(data=[{"embedding": [0.1], "index": 0, "object": "embedding"}])
    assert response_texts(embeddings) == []
    anthropic = {"content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "input": {}}]}
    assert response_texts(anthropic) == [Text("hi", "content")]


# -- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"treshold": 0.8}, r"unknown parameter\(s\) 'treshold' for GuardmergeGuardrail; its own are model, api_base"),
        ({"model": None}, "give exactly one of model .* and api_base .*; got neither"),
        ({"api_base": "http://x:1"}, "got both"),
        ({"thresholds": {"injection": 1.5}}, r"thresholds: threshold 'injection=1.5': 1.5 is outside \[0, 1\]"),
        ({"thresholds": {"injection": "high"}}, "thresholds: threshold 'injection=high': 'high' is not a number"),
        (
            {"thresholds": {"toxicity": 0.5}},
            r"threshold for unknown task\(s\) toxicity; this model has: hate, injection, sentiment",
        ),
        ({"thresholds": {"injection.nope": 0.5}}, "head 'injection' has no label 'nope'"),
        (
            {"tasks": ["injection", "nope"]},
            r"tasks: unknown task\(s\) 'nope'; this model has: hate, injection, sentiment",
        ),
        ({"tasks": []}, "tasks is empty"),
        ({"tasks": "injection"}, "tasks must be a list of head names"),
        ({"benign": {"hate": 3}}, "benign: 'hate' must be a list of labels"),
        (
            {"event_hook": "logging_only"},
            "mode 'logging_only' is not supported: use one or more of pre_call, during_call, post_call",
        ),
        ({"event_hook": ["pre_call", "pre_mcp_call"]}, "mode 'pre_mcp_call' is not supported"),
        ({"backend": "tf"}, "backend: unknown backend 'tf': use one of torch, onnx"),
        ({"timeout": 0}, "timeout must be a number from 0.001 to 3600"),
        ({"chunk_chars": 2.5}, "chunk_chars must be an integer"),
        ({"default_threshold": -1}, "default_threshold must be a number from 0 to 1"),
        ({"api_key": "k"}, "api_key is for api_base"),
        ({"unreachable_fallback": "fail_open"}, "guardmerge always fails closed"),
        ({"model": "/no/such/folder"}, "model: model folder '/no/such/folder' does not exist"),
    ],
)
def test_bad_configuration_names_the_field(merged_dir: Path, params: dict[str, Any], message: str) -> None:
    with pytest.raises(GuardmergeError, match=message) as caught:
        GuardmergeGuardrail(**{"model": str(merged_dir), **params})
    assert not isinstance(caught.value, (ValueError, TypeError))  # LiteLLM's proxy would start without it


def test_yaml_off_turns_a_flag_off(merged_model) -> None:
    """YAML reads an unquoted ``off`` as false: it means off, as ``"off"`` and null do."""
    g = GuardmergeGuardrail(
        model=merged_model, thresholds=yaml.safe_load("{hate: off, injection: 'off', sentiment: null}")
    )
    try:
        assert [r.threshold for r in g._checker.rules.values()] == [None, None, None]
    finally:
        g.close()
    with pytest.raises(GuardmergeError, match="thresholds: 'hate' must be a number in \\[0, 1\\] or 'off', got True"):
        GuardmergeGuardrail(model=merged_model, thresholds={"hate": True})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"api_base": "ftp://x"}, "api_base must be an http"),
        ({"api_base": "http://x", "api_key": " "}, "api_key is empty or blank"),
        (
            {"api_base": "http://x", "thresholds": {"injection": 0.5}},
            "thresholds: set for a local model; with api_base the server flags",
        ),
        ({"api_base": "http://x", "backend": "onnx"}, "backend: set for a local model"),
    ],
)
def test_bad_server_configuration_names_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(GuardmergeError, match=message):
        GuardmergeGuardrail(**params)


def test_missing_litellm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "litellm" or m.startswith("litellm.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "guardmerge.integrations.litellm")
    with pytest.raises(GuardmergeError, match=r"needs LiteLLM: pip install 'guardmerge\[litellm\]'"):
        importlib.import_module("guardmerge.integrations.litellm")


def proxy_guardrail(entry: dict[str, Any]) -> GuardmergeGuardrail:
    """A guardrail built from a ``guardrails:`` entry of LiteLLM's config.yaml the way its proxy
    builds a custom one (``InMemoryGuardrailHandler.initialize_custom_guardrail``): every
    ``litellm_params`` field set or with a default, less guardrail, mode, default_on, stream_scope."""
    params = LitellmParams(**entry["litellm_params"])
    extra = {
        k: v
        for k, v in params.model_dump(exclude_none=True).items()
        if k not in ("guardrail", "mode", "default_on", "stream_scope")
    }
    return GuardmergeGuardrail(
        guardrail_name=entry["guardrail_name"], event_hook=params.mode, default_on=params.default_on, **extra
    )


PROXY = """
import json, os, sys
from fastapi.testclient import TestClient

try:
    from litellm.proxy.proxy_server import app
except (ImportError, RuntimeError) as exc:  # a proxy dependency is missing
    print(exc)
    sys.exit(3)

key = {"Authorization": "Bearer " + os.environ["LITELLM_MASTER_KEY"]}
with TestClient(app) as client:
    answers = [client.post("/v1/chat/completions", headers=key, json=body) for body in json.loads(sys.argv[1])]
print(json.dumps([[a.status_code, a.text] for a in answers]))
"""


def test_the_real_proxy_blocks_and_passes_by_its_config(llm, merged_dir: Path, tmp_path: Path) -> None:
    """LiteLLM's proxy app (needs ``litellm[proxy]``; skipped without it), run in a subprocess
    with a config.yaml of two guardrails, one flagging every prompt and one none."""
    import importlib.util
    import json
    import subprocess

    if not all(importlib.util.find_spec(m) for m in ("backoff", "websockets", "orjson", "apscheduler", "fastapi_sso")):
        pytest.skip("LiteLLM's proxy dependencies are missing (pip install 'litellm[proxy]')")

    def entry(name: str, thresholds: dict[str, Any]) -> dict[str, Any]:
        params = {"guardrail": "guardmerge.integrations.litellm.GuardmergeGuardrail", "mode": "pre_call"}
        return {
            "guardrail_name": name,
            "litellm_params": {**params, "model": str(merged_dir), "thresholds": thresholds},
        }

    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {"model": "openai/fake-model", "api_base": llm["url"] + "/v1", "api_key": "sk-test"},
            }
        ],
        "guardrails": [entry("flag-all", {**ALL_OFF, "injection": 0.0}), entry("flag-none", ALL_OFF)],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    bodies = [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": TEXTS[0]}], "guardrails": [name]}
        for name in ("flag-all", "flag-none")
    ]
    env = {
        **os.environ,
        "CONFIG_FILE_PATH": str(path),
        "LITELLM_MASTER_KEY": "sk-" + "0123456789abcdef" * 4,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    before = len(llm["calls"])
    done = subprocess.run(
        [sys.executable, "-c", PROXY, json.dumps(bodies)], env=env, capture_output=True, text=True, timeout=240
    )
    if done.returncode == 3:
        pytest.skip(f"LiteLLM's proxy dependencies are missing ({done.stdout.strip()[-200:]})")
    assert done.returncode == 0, done.stderr[-3000:]
    (blocked_status, blocked), (passed_status, passed) = json.loads(done.stdout.strip().splitlines()[-1])
    assert blocked_status == 400
    message = json.loads(blocked)["error"]["message"]
    assert re.fullmatch(
        BLOCKED.format(what="request", task="injection", label="injection", where=r"message 0 \(user\)"), message
    )
    assert passed_status == 200 and json.loads(passed)["choices"][0]["message"]["content"] == ANSWER
    assert len(llm["calls"]) == before + 1  # only the request that passed reached the LLM


# -- the README example -----------------------------------------------------------------------------------


def readme_example() -> tuple[dict[str, Any], str]:
    """The README's LiteLLM example: its config.yaml (parsed) and its Python code."""
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- litellm-example:start -->", "<!-- litellm-example:end -->"
    if start not in text or end not in text:
        pytest.skip("README.md has no LiteLLM example yet")
    block = text.split(start, 1)[1].split(end, 1)[0]
    config = yaml.safe_load(block.split("```yaml\n", 1)[1].split("```", 1)[0])
    return config, block.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_config_builds_the_guardrail_as_the_proxy_does(merged_dir: Path, loop) -> None:
    config, _ = readme_example()
    entry = config["guardrails"][0]
    assert entry["litellm_params"]["guardrail"] == f"{GuardmergeGuardrail.__module__}.{GuardmergeGuardrail.__name__}"
    thresholds = entry["litellm_params"]["thresholds"]
    assert set(thresholds) <= {"injection", "emotion", "offensive"}  # the demo model's heads
    entry["litellm_params"]["model"] = str(merged_dir)  # the tiny model: hate, injection, sentiment
    entry["litellm_params"]["thresholds"] = {k: v for k, v in thresholds.items() if k in MERGED_TASKS}
    g = proxy_guardrail(entry)
    try:
        assert g.guardrail_name == "guardmerge" and g.default_on is True
        assert g.event_hook == ["pre_call", "post_call"]
        assert g.tasks == list(MERGED_TASKS)
        assert g.should_run_guardrail({"messages": []}, GuardrailEventHooks.post_call)
        entry["litellm_params"]["thresholds"] = {"injection": 0.0}
        flagging = proxy_guardrail(entry)
        with pytest.raises(GuardmergeBlocked, match="head 'injection'"):
            run(
                loop,
                flagging.async_pre_call_hook(
                    None, None, {"messages": [{"role": "user", "content": "hi"}]}, "acompletion"
                ),
            )
        flagging.close()
    finally:
        g.close()


def test_the_real_proxy_builds_the_guardrail_from_its_config(merged_dir: Path, tmp_path: Path) -> None:
    """LiteLLM's own initializer (needs ``litellm[proxy]``; skipped without it)."""
    try:
        from litellm.proxy.guardrails.guardrail_registry import InMemoryGuardrailHandler
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"LiteLLM's proxy dependencies are missing ({exc})")
    config, _ = readme_example()
    entry = config["guardrails"][0]
    entry["litellm_params"]["model"] = str(merged_dir)
    entry["litellm_params"]["thresholds"] = {"injection": 0.8}
    built = InMemoryGuardrailHandler().initialize_custom_guardrail(
        entry,
        entry["litellm_params"]["guardrail"],
        LitellmParams(**entry["litellm_params"]),
        str(tmp_path / "config.yaml"),
    )
    try:
        assert isinstance(built, GuardmergeGuardrail) and built.tasks == list(MERGED_TASKS)
    finally:
        litellm.logging_callback_manager.remove_callback_from_all_lists(built)
        built.close()


def test_readme_python_example_runs(merged_dir: Path) -> None:
    _, code = readme_example()
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # not as __main__: its demo call does not run
    saved = list(litellm.callbacks)
    prompts = ["What is the capital of France?", TEXTS[0]]
    try:
        assert asyncio.run(namespace["guarded_chat"](str(merged_dir), prompts, ALL_OFF)) == ["Paris.", "Paris."]
        refused = asyncio.run(namespace["guarded_chat"](str(merged_dir), prompts, {**ALL_OFF, "injection": 0.0}))
        for answer in refused:
            pattern = BLOCKED.format(what="request", task="injection", label="injection", where=r"message 0 \(user\)")
            assert re.fullmatch("refused: " + pattern, answer)
    finally:
        for callback in list(litellm.callbacks):
            if isinstance(callback, GuardmergeGuardrail):
                litellm.logging_callback_manager.remove_callback_from_all_lists(callback)
                callback.close()
        litellm.callbacks = saved
