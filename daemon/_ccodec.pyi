# The compiled body decoder (daemon/_ccodec.c); used through daemon/accel.py.
from collections.abc import Callable
from typing import Any

def configure(record_type: type, batch_type: type, produce_type: type,
              error_type: type[BaseException]) -> None: ...
def decode_sections(data: bytes, pos: int, events: Callable[[bytes, int, int], Any]
                    ) -> tuple[list[Any], int, int | None, int | None]: ...
def decode_produce(data: bytes, pos: int, events: Callable[[bytes, int, int], Any],
                   tail: tuple[tuple[str, bytes | None], ...], offset_header: str | None
                   ) -> tuple[list[Any], int, int | None, int | None]: ...
