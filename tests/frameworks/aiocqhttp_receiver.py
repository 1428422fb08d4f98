"""aiocqhttp as an HTTP POST bot behind lifeguard, for tests/framework_http.rs.

It receives the events lifeguard POSTs (checking X-Signature with SECRET, as aiocqhttp
does), records each one as a JSON line in OUT, answers messages with a quick operation,
and calls the OneBot HTTP API through lifeguard (API_ROOT, ACCESS_TOKEN): on each message
(get_login_info) and on each lifecycle `disable` (get_status, which must fail at once).

Usage: aiocqhttp_receiver.py PORT API_ROOT ACCESS_TOKEN SECRET OUT
"""
import json
import sys
import time

from aiocqhttp import CQHttp, Event
from aiocqhttp.exceptions import Error as CQError, HttpFailed

port, api_root, token, secret, out = sys.argv[1:6]
bot = CQHttp(api_root=api_root, access_token=token, secret=secret, api_timeout_sec=10)


def record(kind, **fields):
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")


async def call_api(action):
    t0 = time.monotonic()
    try:
        data = await bot.call_action(action)
        result = {"ok": True, "data": data}
    except HttpFailed as e:
        result = {"ok": False, "http_status": e.status_code}
    except CQError as e:
        result = {"ok": False, "error": repr(e)}
    result["ms"] = round((time.monotonic() - t0) * 1000)
    return result


@bot.on_meta_event
async def meta(event: Event):
    fields = {"meta_event_type": event.meta_event_type, "sub_type": event.get("sub_type"),
              "self_id": event.self_id}
    if event.get("sub_type") == "disable":
        fields["api"] = await call_api("get_status")
    record("meta", **fields)


@bot.on_message
async def message(event: Event):
    api = await call_api("get_login_info")
    record("message", message_id=event.message_id, self_id=event.self_id, api=api)
    return {"reply": f"pong {event.message_id}", "auto_escape": True}


bot.run(host="127.0.0.1", port=int(port))
