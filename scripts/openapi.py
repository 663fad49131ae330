#!/usr/bin/python3
"""Writes docs/openapi.json, the OpenAPI 3.0 document of peerd's admin API: the routes below and a
schema per message of proto/admin.proto in protobuf's JSON mapping (lowerCamelCase names, 64-bit
integers as strings), each field described by its comment in the .proto.

tests/admin_requests_test.cc checks the document against the routes the server really has
(service/net/admin_requests.cc: AdminRoutes) and every schema against the compiled messages, so a
route or field added without running this fails the build's tests.

usage: scripts/openapi.py [OUT]   (default docs/openapi.json)"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCALARS = {
    "double": {"type": "number"}, "float": {"type": "number"},
    "int32": {"type": "integer", "format": "int32"}, "uint32": {"type": "integer", "format": "int32", "minimum": 0},
    "int64": {"type": "string", "format": "int64"}, "uint64": {"type": "string", "format": "uint64"},
    "fixed64": {"type": "string", "format": "uint64"},
    "bool": {"type": "boolean"}, "string": {"type": "string"}, "bytes": {"type": "string", "format": "byte"},
}


def camel(name):
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def parse_messages(text):
    """{qualified name: [(json name, type, label, comment)]} for every message, nested ones as Outer.Inner."""
    messages, stack, pending_comment = {}, [], []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("//"):
            pending_comment.append(line[2:].strip())
            continue
        m = re.match(r"message (\w+) \{(.*)", line)
        if m:
            stack.append(m.group(1))
            messages[".".join(stack)] = []
            rest = m.group(2).strip()
            if rest.endswith("}"):  # one-line message
                f = re.match(r"(repeated |optional )?([\w.]+) (\w+) = \d+;", rest)
                if f:
                    messages[".".join(stack)].append((camel(f.group(3)), f.group(2), (f.group(1) or "").strip(), ""))
                stack.pop()
            pending_comment = []
            continue
        if line.startswith("}") and stack:
            stack.pop()
            pending_comment = []
            continue
        if not stack:
            continue
        f = re.match(r"(repeated |optional )?(map<(\w+), ([\w.]+)>|[\w.]+) (\w+) = \d+;\s*(//\s*(.*))?", line)
        if f:
            comment = " ".join(pending_comment + ([f.group(7)] if f.group(7) else []))
            kind = ("map:" + f.group(4)) if f.group(3) else f.group(2)
            messages[".".join(stack)].append((camel(f.group(5)), kind, (f.group(1) or "").strip(), comment))
        pending_comment = []
    return messages


def schema_of(kind, scope, messages, enums):
    if kind.startswith("map:"):
        return {"type": "object", "additionalProperties": schema_of(kind[4:], scope, messages, enums)}
    if kind in SCALARS:
        return dict(SCALARS[kind])
    if kind in enums:
        return {"type": "string", "enum": enums[kind]}
    # A message: nested in the current scope first, then at the top.
    for candidate in (scope + "." + kind, kind):
        if candidate in messages:
            return {"$ref": "#/components/schemas/" + candidate.replace(".", "_")}
    raise SystemExit(f"openapi.py: unknown type {kind} in {scope}")


def schemas(messages, enums):
    out = {}
    for name, fields in messages.items():
        props = {}
        for json_name, kind, label, comment in fields:
            s = schema_of(kind, name, messages, enums)
            if label == "repeated":
                s = {"type": "array", "items": s}
            if comment:
                s = {"description": comment, **s} if "$ref" not in s else {"description": comment, "allOf": [s]}
            props[json_name] = s
        out[name.replace(".", "_")] = {"type": "object", "properties": props}
    return out


def body(ref):
    return {"required": False, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/" + ref}}}}


def answer(ref, what="OK"):
    return {"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/" + ref}}}}


def route(summary, reply, request=None, params=None, extra=None, public=False):
    op = {"summary": summary, "responses": {"200": reply if isinstance(reply, dict) and "description" in reply else answer(reply)}}
    for code, what in [("400", "bad request: the message says what was wrong"), ("401", "missing or wrong token"),
                       ("404", "no such route or object"), ("409", "not possible in the current state"),
                       ("503", "peerd is busy or stopping: try again")]:
        op["responses"][code] = answer("ErrorBody", what)
    if request:
        op["requestBody"] = body(request)
    if params:
        op["parameters"] = params
    if extra:
        op.update(extra)
    if public:
        op["security"] = []
        op["responses"] = {"200": op["responses"]["200"]}
        if summary.startswith("readiness"):
            op["responses"]["503"] = {"description": "not ready, and why (stopping, training stopped, ingest stopped)"}
        if op["responses"]["200"]["description"].startswith("not used"):
            op["responses"] = {"303": {"description": "see Other: to / (with Set-Cookie)"}}
    return op


def path_param(name, schema, what):
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": what}


def query_param(name, schema, what):
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": what}


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "openapi.json"
    text = (ROOT / "proto" / "admin.proto").read_text()
    store = (ROOT / "proto" / "store.proto").read_text()
    enums = {m.group(1): re.findall(r"(\w+) = \d+;", m.group(2)) for m in re.finditer(r"enum (\w+) \{([^}]*)\}", store)}
    messages = parse_messages(text)
    internal = {"CheckpointMeta"}  # kept in the data directory, never sent
    messages = {k: v for k, v in messages.items() if k.split(".")[0] not in internal}

    seg_id = path_param("id", {"type": "integer", "minimum": 0, "maximum": 999999999}, "the segment's id")
    task_name = path_param("name", {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "the task's name")
    text_reply = lambda what, ctype="text/plain": {"description": what, "content": {ctype: {"schema": {"type": "string"}}}}
    paths = {
        "/v1/status": {"get": route("step, loss, speed, spool, segments, and why anything stopped", "StatusReply")},
        "/v1/segments": {"get": route("every expert segment of every PEER layer", "SegmentsReply"),
                         "post": route("add a training segment (to every PEER layer unless one is named)", "OkReply", "AddSegmentRequest")},
        "/v1/segments/{id}/freeze": {"post": route("freeze a training segment into the expert store, for ever", "OkReply", "FreezeRequest", [seg_id])},
        "/v1/tasks": {"get": route("the held-out tasks", "TasksReply"),
                      "post": route("register (or replace) a held-out task and the ingest task it measures", "OkReply", "TaskRequest")},
        "/v1/tasks/{name}": {"delete": route("delete a held-out task and its column of the evaluation rows", "OkReply", params=[task_name])},
        "/v1/eval": {"post": route("score every held-out task now and record the row", "EvalRow", "EvalRequest"),
                     "get": route("the evaluation rows and the forgetting metrics (ACC, BWT, FWT, forgetting)", "ForgettingReport")},
        "/v1/history": {"get": route("the training history: every step (old ones as means), and the evaluation rows", "HistoryReply", params=[
            query_param("since", {"type": "integer", "minimum": 0}, "only steps after this one (default 0)"),
            query_param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "most points returned (default 2000)")])},
        "/v1/score": {"post": route("bits per byte of a text, and which segments answered; no side effect", "ScoreReply", "ScoreRequest")},
        "/v1/generate": {"post": route("continue a prompt with the model as it is now; with stream, server-sent events", {
            "description": "the generated text (or, with stream: text/event-stream, one GenerateReply with text per event, then one with everything but the text)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateReply"}},
                        "text/event-stream": {"schema": {"type": "string"}}}}, "GenerateRequest")},
        "/v1/export": {"get": route("the model as a safetensors stream; the manifest is in its metadata", text_reply("safetensors", "application/octet-stream"))},
        "/v1/checkpoint": {"post": route("write a checkpoint now", "OkReply")},
        "/v1/train/pause": {"post": route("pause training", "OkReply")},
        "/v1/train/resume": {"post": route("resume training (after a training error: retry)", "OkReply")},
        "/v1/policy": {"get": route("what trains: groups, replay, distillation, learning rate, routing", "Policy"),
                       "put": route("change the policy; omitted fields stay", "Policy", "Policy")},
        "/metrics": {"get": route("Prometheus text exposition", text_reply("metrics", "text/plain; version=0.0.4"))},
        "/": {"get": route("the live page (no token: it holds no data; it signs in with POST /login)", text_reply("HTML", "text/html"), public=True)},
        "/dashboard.js": {"get": route("the live page's script (no token)", text_reply("JavaScript", "text/javascript"), public=True)},
        "/login": {"post": route("sign a browser in: form field token=ADMIN_TOKEN; 303 to / with an HttpOnly, SameSite=Strict session cookie that authorises GET requests until peerd restarts (a wrong token: 303 to /?login=failed)", {"description": "not used: the answer is 303"}, public=True,
                   extra={"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}}}}})},
        "/logout": {"post": route("sign a browser out: 303 to / with the session cookie expired", {"description": "not used: the answer is 303"}, public=True)},
        "/healthz": {"get": route("liveness: answers while peerd's admin thread runs (no token)", text_reply("{\"status\":\"alive\"}", "application/json"), public=True)},
        "/readyz": {"get": route("readiness: training and ingest both working (no token)", text_reply("{\"status\":\"ready\"}", "application/json"), public=True)},
    }
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "peerd admin API", "version": "1",
                 "description": "Steer a running peerd: segments, held-out tasks, evaluations, history, policy, the model. "
                                "JSON bodies are protobuf's JSON mapping of proto/admin.proto. Every route but the probes "
                                "needs 'Authorization: Bearer <token>' with the token in DATA_DIR/admin.token."},
        "servers": [{"url": "http://127.0.0.1:7071"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": schemas(messages, enums)},
    }
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
