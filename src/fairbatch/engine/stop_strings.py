"""Stop strings for the offline ``LLM`` (``SamplingParams.stop``), as vLLM's ``LLM`` has
them: the text is watched as tokens come (the server's detokeniser,
``server/output.py``), and a request whose text reaches a stop string is ended there
(aborted in the scheduler, its KV freed at once) with ``finish_reason="stop"`` and
``stop_reason`` the string; the text ends before it, or after it with
``include_stop_str_in_output``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fairbatch.engine.params import RequestOutput, SamplingParams
from fairbatch.request import Request, RequestState


class StopStrings:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.watching: dict[str, Any] = {}        # request id -> OutputProcessor

    def watch(self, req: Request) -> None:
        sp = req.sampling
        if isinstance(sp, SamplingParams) and sp.stop:
            from fairbatch.server.output import OutputProcessor    # plain Python, no server deps

            self.watching[req.request_id] = OutputProcessor(
                self.decode, sp.stop, include_stop_str=sp.include_stop_str_in_output, min_tokens=sp.min_tokens,
                stop_token_ids=sp.stop_token_ids)

    def after_step(self, reqs: Sequence[Request], abort: Callable[[str], Any]) -> list[Request]:
        """Feed the step's new tokens; abort and return the requests a stop string ended."""
        if not self.watching:
            return []
        ended = []
        for req in reqs:
            proc = self.watching.get(req.request_id)
            if proc is None or proc.finish_reason is not None:
                continue
            new = req.output_token_ids[proc.num_tokens:]
            # (a request whose last token is still in flight, one step ahead, is not done yet)
            final = req.state is RequestState.FINISHED and len(req.output_token_ids) >= req.generated
            if new or final:
                proc.feed(new, final=final, stopped_by_token=final and req.finish_reason == "stop")
            if proc.finish_reason == "stop" and not final:
                abort(req.request_id)
                ended.append(req)
        return ended

    def apply(self, req: Request, out: RequestOutput) -> None:
        """The watched request's text, finish and stop reason, into its output."""
        proc = self.watching.get(req.request_id)
        if proc is None:
            return
        c = out.outputs[0]
        out.text = c.text = proc.text
        if proc.finish_reason == "stop":
            out.finish_reason = c.finish_reason = "stop"
        c.stop_reason = proc.stop_reason
