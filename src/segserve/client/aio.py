"""asyncio use of the client: AsyncSegservClient's coroutines run SegservClient's calls in worker threads.

    async with AsyncSegservClient("http://127.0.0.1:8080", concurrency=8) as client:
        mask = (await client.predict("cells.png", format="png")).mask()
        async for result in client.predict_many(paths):
            ...

Why threads and not an async HTTP library: the base install is requests, numpy, Pillow and tqdm (no torch,
no async stack), and a prediction spends its time in the server, not in the client; one code path keeps the
retries, token handling and errors exactly the sync client's. `concurrency` bounds the requests in flight
(a semaphore) whatever the number of tasks awaiting.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .api import OPTION_ERRORS, ImageInput, Prediction, SegservClient
from .errors import SegservError


class AsyncSegservClient:
    """The coroutine face of SegservClient; takes SegservClient's arguments plus `concurrency`."""

    def __init__(self, *args: Any, concurrency: int = 4, client: SegservClient | None = None, **kwargs: Any):
        self.client = client or SegservClient(*args, **kwargs)
        self.concurrency = max(1, concurrency)
        self.client._ensure_pool(self.concurrency)
        self._slots = asyncio.Semaphore(self.concurrency)

    async def __aenter__(self) -> AsyncSegservClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.client._own_session:
            self.client.session.close()

    async def _call(self, method, *args: Any, **kwargs: Any) -> Any:
        async with self._slots:
            return await asyncio.to_thread(functools.partial(method, *args, **kwargs))

    async def predict(self, image: ImageInput, **options: Any) -> Prediction:
        """SegservClient.predict, awaited; raises the same SegservErrors."""
        return await self._call(self.client.predict, image, **options)

    async def health(self) -> dict:
        return await self._call(self.client.health)

    async def models(self) -> list[dict]:
        return await self._call(self.client.models)

    async def predict_many(self, images: Iterable[ImageInput], **options: Any) -> AsyncIterator[
            Prediction | SegservError]:
        """Each image's Prediction or SegservError (with `index` and `source`) as it finishes, at most
        `concurrency` in flight and as many held; after an option refusal nothing more is sent and the rest are
        yielded with that error, as SegservClient.predict_many does."""
        waiting = enumerate(images)
        pending: set[asyncio.Task] = set()
        refused: SegservError | None = None

        async def one(index: int, image: ImageInput) -> Prediction | SegservError:
            result = await self._call(self.client._predict_or_error, index, image, options)
            return result

        def send_more() -> None:
            while refused is None and len(pending) < self.concurrency:
                item = next(waiting, None)
                if item is None:
                    return
                pending.add(asyncio.ensure_future(one(*item)))

        try:
            send_more()
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.result().index):
                    pending.discard(task)
                    result = task.result()
                    if refused is None and isinstance(result, SegservError) and result.type in OPTION_ERRORS:
                        refused = result
                    yield result
                send_more()
            for index, image in waiting if refused is not None else ():
                yield refused.copy_for(index, image)
        finally:
            for task in pending:
                task.cancel()
