"""A real NoneBot2 bot (FastAPI driver on uvicorn, OneBot V11 adapter) serving reverse
WebSocket, for tests/frameworks.rs. It records what it sees, one JSON line each, to
$BOT_RECORD: its bots connecting and disconnecting (NoneBot's own hooks), every event by
NoneBot's name for it, and the answer to an API call made through the connection.

Environment: BOT_PORT (where it listens), BOT_RECORD (the file), BOT_TOKEN (ONEBOT_ACCESS_TOKEN).
"""

import json
import os
import time

import nonebot
from nonebot.adapters.onebot.v11 import Adapter, Bot, Event
from nonebot.message import event_preprocessor

record = open(os.environ["BOT_RECORD"], "a", buffering=1, encoding="utf-8")


def rec(kind: str, **fields) -> None:
    record.write(json.dumps({"t": time.time(), "kind": kind, **fields}, ensure_ascii=False) + "\n")


nonebot.init(
    driver="~fastapi",
    host="127.0.0.1",
    port=int(os.environ["BOT_PORT"]),
    onebot_access_token=os.environ.get("BOT_TOKEN", ""),
    log_level="INFO",
)
driver = nonebot.get_driver()
driver.register_adapter(Adapter)


@driver.on_bot_connect
async def connected(bot: Bot) -> None:
    rec("connect", self_id=bot.self_id)
    try:
        info = await bot.get_login_info()
        rec("api", action="get_login_info", user_id=info.get("user_id"))
    except Exception as e:  # recorded, not raised: the test reads the record
        rec("api-error", action="get_login_info", error=repr(e))


@driver.on_bot_disconnect
async def disconnected(bot: Bot) -> None:
    rec("disconnect", self_id=bot.self_id)


@event_preprocessor
async def every_event(bot: Bot, event: Event) -> None:
    rec("event", self_id=bot.self_id, name=event.get_event_name())


if __name__ == "__main__":
    rec("start")
    nonebot.run()
