"""OpenAI's Responses API (`POST /v1/responses`) on the policy, trainable: pure translation to and from chat.

vLLM serves `/v1/responses` itself, but only its chat route returns exact token ids and logprobs for every turn
(tool-call-only turns included), so the proxy sends each Responses request to vLLM as a chat-completions request
and turns the chat answer back into a Responses `response` object or the Responses stream events.

* `FIELDS`: what happens to each request field (translated, passed, ignored, refused; proxy/api_fields.py).
* `to_chat(body)`: the client's screened request -> the chat request (the caller adds token-id and logprob fields).
* `from_chat(chat, request, response_id=, created_at=)`: a non-stream chat completion -> a `response` object.
* `ResponsesStream`: chat chunks -> Responses SSE bytes (`event: <type>\\ndata: <json>\\n\\n`), in OpenAI's order.

Nothing is stored server-side, so requests that refer to stored state (`previous_response_id`, `conversation`,
`item_reference` items, stored `prompt`s, `background` responses, file ids) are refused with a 400 that says so.
`reasoning` and `include: ["reasoning.encrypted_content"]` are accepted; a policy served without a reasoning parser
gives answers with no reasoning items (what a reasoning policy needs: docs/architecture.md).
Item ids are derived from the response id (`msg_<suffix>_<output index>`), so the streamed and the non-stream
answer for the same generation are equal, and a recorded response can be compared with what the client saw.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from trainwire.proxy.api_fields import FieldTable, ignored, passed, refused, translated
from trainwire.proxy.errors import ApiError

# vLLM sampling extensions agents send through `extra_body`: they mean the same on chat, so they pass.
_VLLM_EXTENSIONS = (
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "chat_template_kwargs",
)


def _not_false(value: Any) -> bool:
    return value is not False


_NO_STORAGE = "trainwire stores no responses"
_OPENAI_SIDE = "only OpenAI's own storage, caching, billing or routing uses it"
_VLLM = "vLLM's sampling extension, the same on chat (sent through `extra_body`)"

# Every top-level field of a Responses request (the `openai` SDK's ResponseCreateParams, plus the vLLM extensions
# agents send): what the proxy does with it (proxy/api_fields.py).
FIELDS = FieldTable(
    "Responses API",
    {
        "model": translated("the policy's name"),
        "input": translated("messages, function calls and their outputs -> chat messages"),
        "instructions": translated("the system message"),
        "tools": translated("function tools -> chat tools; hosted tools are refused item by item"),
        "tool_choice": translated("-> chat tool_choice"),
        "parallel_tool_calls": translated("-> chat parallel_tool_calls"),
        "temperature": translated("-> chat temperature (then --sampling-policy)"),
        "top_p": translated("-> chat top_p (then --sampling-policy)"),
        "max_output_tokens": translated("-> chat max_tokens"),
        "stream": translated("a Responses event stream from the chat stream"),
        "text": translated("text.format -> chat response_format"),
        "user": passed("the same field on chat"),
        **{name: passed(_VLLM) for name in _VLLM_EXTENSIONS},
        "store": ignored(f"{_NO_STORAGE}; store: false is what happens anyway", applies=_not_false),
        "metadata": ignored("echoed in the response, not sent to the model"),
        "reasoning": ignored(
            "the policy has no reasoning parser, so its answers have no reasoning items to summarise "
            "(docs/architecture.md: reasoning policies)"
        ),
        "include": ignored(
            "asks for extra output data (encrypted reasoning, logprobs, hosted tools' results) that this route "
            "does not produce"
        ),
        "top_logprobs": ignored("output logprobs are not returned here (always [])"),
        "truncation": ignored("a context overflow fails with the model server's 400 either way"),
        "context_management": ignored(
            "server-side compaction; the policy sees the input as sent (an overflow fails with a 400)"
        ),
        "max_tool_calls": ignored("limits hosted tools, which are refused"),
        "service_tier": ignored(_OPENAI_SIDE),
        "prompt_cache_key": ignored(_OPENAI_SIDE),
        "prompt_cache_retention": ignored(_OPENAI_SIDE),
        "prompt_cache_options": ignored(_OPENAI_SIDE),
        "safety_identifier": ignored(_OPENAI_SIDE),
        "access_programs": ignored(_OPENAI_SIDE),
        "moderation": ignored("no moderation model runs here: nothing is scored or blocked"),
        "image": ignored("OpenAI's image context compression; images are sent to the model as given"),
        "stream_options": ignored("stream obfuscation: the stream has no obfuscation fields"),
        "background_options": ignored("only with background: true, which is refused"),
        "background": refused(
            f"background mode is not supported: {_NO_STORAGE} to poll later; send the request without "
            "background (streaming works)",
            applies=_not_false,
        ),
        "previous_response_id": refused(
            f"previous_response_id is not supported: {_NO_STORAGE}. Send the whole conversation in `input` (the "
            "earlier input, the previous response's output items, then the new input)"
        ),
        "conversation": refused(
            f"conversation is not supported: {_NO_STORAGE} or conversations. Send the whole conversation in `input`"
        ),
        "prompt": refused(
            "stored prompts (prompt) are not supported: trainwire has no prompt templates; send the text in "
            "`instructions` and `input`"
        ),
        "n": refused("Unsupported parameter: 'n' (a Responses request has one output; n is a chat parameter)"),
    },
)
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _invalid(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _unsupported(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_value")


# --- request: Responses -> chat ------------------------------------------------------------------------------


def to_chat(body: dict) -> dict:
    """A Responses request, screened by `FIELDS` (proxy/api_fields.py: only translated and passed fields, no
    nulls) -> the chat-completions request for vLLM. Raises ApiError(400) for bad or unsupported input, naming the
    parameter."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None)
    given = {k: v for k, v in body.items() if v is not None}
    chat: dict[str, Any] = {}
    if "model" in given:
        chat["model"] = given["model"]
    chat["messages"] = _messages(given)

    tools = _chat_tools(given.get("tools"))
    if tools:
        chat["tools"] = tools
    choice = _chat_tool_choice(given.get("tool_choice"), has_tools=bool(tools))
    if choice is not None:
        chat["tool_choice"] = choice
    if "parallel_tool_calls" in given:
        chat["parallel_tool_calls"] = given["parallel_tool_calls"]
    for name in ("temperature", "top_p", "stream", "user"):
        if name in given:
            chat[name] = given[name]
    if "max_output_tokens" in given:
        limit = given["max_output_tokens"]
        # Checked here because vLLM would name its own field (max_tokens) in the error.
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise _invalid("max_output_tokens must be a positive integer", "max_output_tokens")
        chat["max_tokens"] = limit
    response_format = _response_format(given.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    for name in _VLLM_EXTENSIONS:
        if name in given:
            chat[name] = given[name]
    return chat


def _messages(given: dict) -> list[dict]:
    messages: list[dict] = []
    instructions = given.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("instructions must be a string", "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})

    source = given.get("input")
    if isinstance(source, str):
        if not source:
            raise _invalid("input must not be empty", "input")
        messages.append({"role": "user", "content": source})
        return messages
    if not isinstance(source, list) or not source:
        raise _invalid("input is required: a string or a non-empty list of input items", "input")
    turns = _input_items(source)
    if not turns:
        raise _invalid("input has no messages (reasoning items alone are dropped)", "input")
    return messages + turns


def _input_items(items: list) -> list[dict]:
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object (an input item)", where)
        kind = item.get("type")
        if kind == "message" or (kind is None and "role" in item):
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _tool_call(item, where)
            last = messages[-1] if messages else None
            # One chat assistant turn = its text and all its calls: that is how the model generated it (and how the
            # chat template renders it back), so the prompt matches the tokens the policy sampled.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _invalid(f"{where}.call_id is required", f"{where}.call_id")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": _tool_output(item.get("output"), f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            # Chat templates drop earlier turns' reasoning anyway, and encrypted reasoning could not be read back.
            continue
        elif kind == "item_reference":
            raise _unsupported(
                f"{where}: item_reference is not supported: {_NO_STORAGE} or items; send the item itself",
                f"{where}.type",
            )
        else:
            raise _unsupported(
                f"{where}: input item type {kind!r} is not supported (supported: message, "
                "function_call, function_call_output, reasoning)",
                f"{where}.type",
            )
    return messages


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in _ROLES:
        raise _invalid(
            f"{where}.role must be one of user, assistant, system, developer (got {role!r})", f"{where}.role"
        )
    if "content" not in item or item["content"] is None:
        raise _invalid(f"{where}.content is required", f"{where}.content")
    return {"role": _ROLES[role], "content": _content(item["content"], f"{where}.content")}


def _content(content: Any, where: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"{where} must be a string or a list of content parts", where)
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _invalid(f"{at} must be an object (a content part)", at)
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": _string(part, "text", at)})
        elif kind == "refusal":
            parts.append({"type": "refusal", "refusal": _string(part, "refusal", at)})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": _image(part, at)})
        elif kind in ("input_file", "input_audio"):
            raise _unsupported(
                f"{at}: content type {kind} is not supported (supported: input_text, output_text, "
                "input_image, refusal)",
                f"{at}.type",
            )
        else:
            raise _invalid(f"{at}: unknown content type {kind!r}", f"{at}.type")
    # A single text part is sent as a plain string: some chat templates only handle string content, and vLLM
    # flattens a one-part list to the same string anyway. Longer lists keep their parts for vLLM to join.
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _image(part: dict, at: str) -> dict:
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        if part.get("file_id"):
            raise _unsupported(
                f"{at}: images by file_id are not supported (trainwire has no Files API); send "
                "image_url, a URL or a data: URL",
                f"{at}.file_id",
            )
        raise _invalid(f"{at}.image_url is required", f"{at}.image_url")
    image = {"url": url}
    if part.get("detail"):
        image["detail"] = part["detail"]
    return image


def _string(obj: dict, key: str, at: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _invalid(f"{at}.{key} must be a string", f"{at}.{key}")
    return value


def _tool_call(item: dict, where: str) -> dict:
    for key in ("call_id", "name"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise _invalid(f"{where}.{key} is required", f"{where}.{key}")
    name = item["name"]
    namespace = item.get("namespace")
    if isinstance(namespace, str) and namespace:
        name = f"{namespace}{NAMESPACE_SEPARATOR}{name}"
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": name, "arguments": _string(item, "arguments", where)},
    }


def _tool_output(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise _invalid(f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(output):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else None
            # Chat's tool messages carry text only; an image would be silently lost.
            raise _unsupported(f"{at}: function_call_output parts must be text (got {kind!r})", f"{at}.type")
        texts.append(_string(part, "text", at))
    return "".join(texts)


def _function_tools(tools: Any) -> list[dict]:
    """The request's tools, checked, in Responses form (also what a response echoes): function tools, and
    namespaces of function tools (Codex CLI groups its sub-agent tools so)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if isinstance(tool, dict) and tool.get("type") == "namespace":
            out.append(_namespace(tool, at))
        else:
            out.append(_function_tool(tool, at))
    return out


def _function_tool(tool: Any, at: str) -> dict:
    if not isinstance(tool, dict):
        raise _invalid(f"{at} must be an object", at)
    kind = tool.get("type")
    if kind != "function":
        raise _unsupported(
            f"{at}: tool type {kind!r} is not supported: the policy model runs only function "
            "tools, which the agent executes (hosted tools such as web_search, file_search, "
            "computer or mcp need OpenAI's servers)",
            f"{at}.type",
        )
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise _invalid(f"{at}.name is required", f"{at}.name")
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _namespace(tool: dict, at: str) -> dict:
    name = tool.get("name")
    if not isinstance(name, str) or not name or NAMESPACE_SEPARATOR in name:
        raise _invalid(f"{at}.name is required (a namespace name without '{NAMESPACE_SEPARATOR}')", f"{at}.name")
    inner = tool.get("tools")
    if not isinstance(inner, list) or not inner:
        raise _invalid(f"{at}.tools must be a non-empty list of function tools", f"{at}.tools")
    return {
        "type": "namespace",
        "name": name,
        "description": tool.get("description") or "",
        "tools": [_function_tool(t, f"{at}.tools[{j}]") for j, t in enumerate(inner)],
    }


# A namespaced function is one chat tool named `<namespace>.<function>`: Responses function names cannot hold a
# '.', so the policy's call splits back into the function and its namespace unambiguously.
NAMESPACE_SEPARATOR = "."


def _chat_function(tool: dict, namespace: str | None = None) -> dict:
    function = {"name": tool["name"] if namespace is None else f"{namespace}{NAMESPACE_SEPARATOR}{tool['name']}"}
    for key in ("description", "parameters", "strict"):
        if tool[key] is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _chat_tools(tools: Any) -> list[dict]:
    chat: list[dict] = []
    for tool in _function_tools(tools):
        if tool["type"] == "namespace":
            chat.extend(_chat_function(inner, tool["name"]) for inner in tool["tools"])
        else:
            chat.append(_chat_function(tool))
    return chat


def _namespaces(request: dict) -> frozenset[str]:
    tools = request.get("tools")
    if not isinstance(tools, list):
        return frozenset()
    return frozenset(
        t["name"]
        for t in tools
        if isinstance(t, dict) and t.get("type") == "namespace" and isinstance(t.get("name"), str)
    )


def _split_name(name: str, namespaces: frozenset[str]) -> tuple[str, str | None]:
    """A chat tool call's function name -> (function name, namespace or None)."""
    if namespaces and NAMESPACE_SEPARATOR in name:
        head, _, tail = name.partition(NAMESPACE_SEPARATOR)
        if head in namespaces and tail:
            return tail, head
    return name, None


def _chat_tool_choice(choice: Any, *, has_tools: bool) -> Any:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        # vLLM refuses any tool_choice without tools; without tools both already mean "answer in text".
        return choice if has_tools else None
    if choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function"):
        if not has_tools:
            raise _invalid("tool_choice needs function tools in `tools`", "tool_choice")
        if choice == "required":
            return choice
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise _invalid("tool_choice.name is required", "tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice, dict):
        raise _unsupported(
            f"tool_choice of type {choice.get('type')!r} is not supported (supported: auto, none, "
            'required, {"type": "function", "name": ...})',
            "tool_choice",
        )
    raise _invalid(f"tool_choice {choice!r} is not valid (auto, none, required or a function)", "tool_choice")


def _response_format(text: Any) -> dict | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _invalid("text must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise _invalid("text.format.name is required", "text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise _invalid("text.format.schema must be an object", "text.format.schema")
        schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _unsupported(
        f"text.format type {kind!r} is not supported (supported: text, json_object, json_schema)", "text.format.type"
    )


# --- answer: chat -> Responses -------------------------------------------------------------------------------


class _Ids:
    def __init__(self, response_id: str) -> None:
        self.suffix = response_id.removeprefix("resp_")

    def item(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.suffix}_{index}"


def _usage(usage: Any) -> dict | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    total = usage.get("total_tokens")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total if total is not None else prompt + completion,
    }


def _status(finish_reason: Any) -> tuple[str, dict | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _response(
    request: dict,
    response_id: str,
    created_at: int,
    *,
    status: str,
    output: list[dict],
    usage: dict | None,
    model: Any = None,
    error: dict | None = None,
    incomplete_details: dict | None = None,
) -> dict:
    parallel = request.get("parallel_tool_calls")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model") or model or "",
        "output": output,
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": request.get("temperature"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": _echo_tools(request.get("tools")),
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def _echo_tools(tools: Any) -> list[dict]:
    try:
        return _function_tools(tools)
    except ApiError:
        # to_chat has refused such a request already; an answer must never fail on its echo.
        return []


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "status": status,
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _function_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str, namespaces: frozenset[str] = frozenset()
) -> dict:
    function, namespace = _split_name(name, namespaces)
    item = {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": function,
        "arguments": arguments,
    }
    if namespace is not None:
        item["namespace"] = namespace
    return item


def _reasoning_of(message: dict) -> Any:
    # vLLM 0.32 names it `reasoning`; older vLLM and other servers `reasoning_content`.
    return message.get("reasoning") or message.get("reasoning_content")


def from_chat(chat: dict, request: dict, *, response_id: str, created_at: int) -> dict:
    """vLLM's non-stream chat completion -> a Responses `response` object for the client's `request`."""
    ids = _Ids(response_id)
    choices = chat.get("choices") or []
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    output: list[dict] = []
    reasoning = _reasoning_of(message)
    if isinstance(reasoning, str) and reasoning:
        output.append(_reasoning_item(ids.item("rs", len(output)), reasoning, "completed"))
    content = message.get("content")
    if isinstance(content, str) and content:
        output.append(_message_item(ids.item("msg", len(output)), content, "completed"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        index = len(output)
        output.append(
            _function_item(
                ids.item("fc", index),
                call.get("id") or ids.item("call", index),
                function.get("name") or "",
                function.get("arguments") or "",
                "completed",
                _namespaces(request),
            )
        )
    status, incomplete = _status(choice.get("finish_reason"))
    if status == "incomplete" and output:
        # Generation stopped inside the last item (OpenAI marks that item incomplete too).
        output[-1]["status"] = "incomplete"
    return _response(
        request,
        response_id,
        created_at,
        status=status,
        output=output,
        usage=_usage(chat.get("usage")),
        model=chat.get("model"),
        incomplete_details=incomplete,
    )


# --- stream: chat chunks -> Responses events ------------------------------------------------------------------


class ResponsesStream:
    """Chat-completion stream chunks (dicts, the proxy's injected fields removed) -> Responses SSE events as bytes.

    Items open when their first non-empty delta arrives (so a tool-call-only turn has no empty message) and close
    when an item of another kind opens or at `finish`, which is OpenAI's order: a text item is done before a tool
    call item is added, and each call is done before the next is added."""

    def __init__(self, request: dict, *, response_id: str, created_at: int) -> None:
        self._request, self._response_id, self._created_at = request, response_id, created_at
        self._ids = _Ids(response_id)
        self._namespaces = _namespaces(request)
        self._sequence = 0
        self._output: list[dict] = []
        self._open: int | None = None  # output index of the item still receiving deltas
        self._calls: dict[int, int] = {}  # chat tool-call index -> output index
        self._usage: dict | None = None
        self._model: Any = None
        self._finish_reason: Any = None
        self._status = "in_progress"
        self._error: dict | None = None
        self._incomplete: dict | None = None
        self._started = self._done = False

    def start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._event("response.created", response=self.response()) + self._event(
            "response.in_progress", response=self.response()
        )

    def feed(self, chunk: dict) -> bytes:
        if self._done:
            return b""
        out = self.start()
        if "error" in chunk:
            return out + self._fail(chunk["error"])
        if self._model is None and chunk.get("model"):
            self._model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # one response has one output list; n > 1 is refused by to_chat
            delta = choice.get("delta") or {}
            reasoning = _reasoning_of(delta)
            if isinstance(reasoning, str) and reasoning:
                out += self._text("reasoning", reasoning)
            if isinstance(delta.get("content"), str) and delta["content"]:
                out += self._text("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._tool_call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return out

    def finish(self) -> bytes:
        if self._done:
            return b""
        out = self.start()
        self._status, self._incomplete = _status(self._finish_reason)
        out += self._close("incomplete" if self._status == "incomplete" else "completed")
        self._done = True
        kind = "response.incomplete" if self._status == "incomplete" else "response.completed"
        return out + self._event(kind, response=self.response())

    def response(self) -> dict:
        return _response(
            self._request,
            self._response_id,
            self._created_at,
            status=self._status,
            output=copy.deepcopy(self._output),
            usage=_usage(self._usage),
            model=self._model,
            error=self._error,
            incomplete_details=self._incomplete,
        )

    # -- internals --

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _add(self, item: dict, part: dict | None = None) -> bytes:
        out = self._close("completed")
        index = len(self._output)
        self._output.append(item)
        self._open = index
        out += self._event("response.output_item.added", output_index=index, item=item)
        if part is not None:
            item["content"].append(part)
            out += self._event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            )
        return out

    def _text(self, kind: str, delta: str) -> bytes:
        out = b""
        item = self._output[self._open] if self._open is not None else None
        if item is None or item["type"] != kind:
            index = len(self._output)
            if kind == "message":
                item = _message_item(self._ids.item("msg", index), "", "in_progress")
            else:
                item = _reasoning_item(self._ids.item("rs", index), "", "in_progress")
            part = item["content"].pop()  # added with empty content, then its part, as OpenAI sends them
            out += self._add(item, part)
        part = item["content"][0]
        part["text"] += delta
        if kind == "message":
            return out + self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self._open,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        return out + self._event(
            "response.reasoning_text.delta", item_id=item["id"], output_index=self._open, content_index=0, delta=delta
        )

    def _tool_call(self, call: dict) -> bytes:
        out = b""
        function = call.get("function") or {}
        chat_index = call.get("index", 0)
        index = self._calls.get(chat_index)
        if index is None:
            index = len(self._output)
            item = _function_item(
                self._ids.item("fc", index),
                call.get("id") or self._ids.item("call", index),
                function.get("name") or "",
                "",
                "in_progress",
                self._namespaces,
            )
            out += self._add(item)
            self._calls[chat_index] = index
        else:
            item = self._output[index]
            if function.get("name") and not item["name"]:
                name, namespace = _split_name(function["name"], self._namespaces)
                item["name"] = name
                if namespace is not None:
                    item["namespace"] = namespace
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            # vLLM streams one call at a time; a late piece for a call already done still reaches the final
            # response and a client that sums deltas, only that call's earlier `done` event would be short.
            item["arguments"] += arguments
            out += self._event(
                "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments
            )
        return out

    def _close(self, status: str) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        item = self._output[index]
        item["status"] = status
        out = b""
        if item["type"] == "function_call":
            out += self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        else:
            part = item["content"][0]
            if item["type"] == "message":
                out += self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                    logprobs=[],
                )
            else:
                out += self._event(
                    "response.reasoning_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                )
            out += self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            )
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _fail(self, error: Any) -> bytes:
        message = error.get("message") if isinstance(error, dict) else error
        if not isinstance(message, str) or not message:
            message = "the model server reported an error during generation"
        if self._open is not None:
            # Left unfinished by the failure; not closed with done events, as OpenAI's failed streams are not.
            self._output[self._open]["status"] = "incomplete"
            self._open = None
        self._status = "failed"
        self._error = {"code": "server_error", "message": message}
        self._done = True
        return self._event("error", code="server_error", message=message, param=None) + self._event(
            "response.failed", response=self.response()
        )
