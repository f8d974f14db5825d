"""Where a joiner's time goes inside the relay: for benchmarks.burst, imported by this directory's sitecustomize.

Active only where ``BENCH_JOIN_TRACE_FILE`` names a file. When the relay imports its WebRTC sessions, hub and
send path, their entry points are wrapped to note, per viewer (its track's name, ``webrtc-<session id[:8]>``),
the wall-clock time of: its POST's handler called (``post_in``), its offer taken up (``offer_in``:
``ViewerSessions.create`` called), its answer made (``answered``), its peer connection connected, ICE and DTLS
(``connected``), and on the way its ICE agent's steps: the first check received (``ice_in``, ``nominated``
when it carried USE-CANDIDATE), its own first check answered (``ice_valid``), its check list completed
(``ice_done``); its subscription to the hub and how it starts (``subscribed``: a keyframe shared, asked for,
or waited for; for a shared one, its age), and the first frame its sender sends (``first_sent``: a keyframe?).
Keyframes the hub publishes are noted too (``keyframe``). Lines ``<wall clock> <event> <name> <detail>`` go to
the file as they come (a joiner's handful, a keyframe a second: nothing a relay notices). Written against the
relay's own names (``signalling.whep.whep_offer``, ``ViewerSessions.create`` and ``_on_state``,
``PacketHub.subscribe`` and ``publish``, ``FrameSender.send``) and aioice's, through ``benchmarks/borrowed.py``
(``trace_ice_steps``, from the first session on); a checkout without one of them traces the rest.
"""

import os

PATH = os.environ.get("BENCH_JOIN_TRACE_FILE")

if PATH:
    import contextvars
    import importlib.abc
    import sys
    import time

    _out = open(PATH, "a", buffering=1)  # noqa: SIM115 - held for the process's life

    def _note(event: str, name: str, detail: str = "", at: float | None = None) -> None:
        _out.write(f"{time.time() if at is None else at:.4f} {event} {name} {detail}\n")

    def _wrap_sessions(module) -> None:
        cls = getattr(module, "ViewerSessions", None)
        if cls is None:
            return
        create, on_state = cls.create, getattr(cls, "_on_state", None)

        async def traced_create(self, *args, **kwargs):
            began = time.time()
            session, answer = await create(self, *args, **kwargs)
            if (post := _post_in.get()) is not None:
                _note("post_in", session.track.name, at=post)
            _note("offer_in", session.track.name, at=began)
            _note("answered", session.track.name)
            agent = _ice_agent_of()(session.pc)  # its ICE agent named, for the ICE steps' lines
            if agent is not None:
                agent.__dict__["_trace_name"] = session.track.name
            return session, answer

        cls.create = traced_create
        if on_state is not None:

            def traced_on_state(self, session):
                if session.pc.connectionState == "connected" and session.connected_at is None:
                    _note("connected", session.track.name)
                return on_state(self, session)

            cls._on_state = traced_on_state

    def _wrap_hub(module) -> None:
        cls = getattr(module, "PacketHub", None)
        if cls is None:
            return
        subscribe, publish = cls.subscribe, cls.publish

        def traced_subscribe(self, name, *args, **kwargs):
            before = (self.keyframe_shares, self.keyframe_requests, getattr(self, "keyframe_requests_merged", 0))
            sub = subscribe(self, name, *args, **kwargs)
            after = (self.keyframe_shares, self.keyframe_requests, getattr(self, "keyframe_requests_merged", 0))
            how = "shared" if after[0] > before[0] else "asked" if after[1] > before[1] else "waits"
            gop = getattr(self, "gop", None)
            age = time.time() - gop.frames[0].published_at if how == "shared" and gop and gop.frames else None
            _note("subscribed", name, how if age is None else f"{how} {age * 1000:.0f}")
            return sub

        def traced_publish(self, frame, *args, **kwargs):
            if frame.keyframe and frame.data[:3] in (b"\0\0\1", b"\0\0\0"):  # H.264 (Annex B), not Opus
                _note("keyframe", self.stream, str(len(frame.data)))
            return publish(self, frame, *args, **kwargs)

        cls.subscribe = traced_subscribe
        cls.publish = traced_publish

    def _wrap_send(module) -> None:
        cls = getattr(module, "FrameSender", None)
        if cls is None:
            return
        send = cls.send

        def traced_send(self, payloads, timestamp, *args, **kwargs):
            sent = send(self, payloads, timestamp, *args, **kwargs)
            if sent and not self.__dict__.get("_trace_sent"):
                self.__dict__["_trace_sent"] = True
                track = self.sender.track
                _note("first_sent", getattr(track, "name", "?"), f"{len(payloads)} {getattr(track, 'kind', '?')}")
            return sent

        cls.send = traced_send

    _post_in = contextvars.ContextVar("jointrace_post_in", default=None)

    def _wrap_whep(module) -> None:
        handler = getattr(module, "whep_offer", None)
        if handler is None:
            return

        async def traced_offer(request):
            _post_in.set(time.time())  # the handler's task: create, awaited in it, reads it
            return await handler(request)

        module.whep_offer = traced_offer

    def _once(agent, event: str) -> None:
        name = agent.__dict__.get("_trace_name")
        if name is not None and not agent.__dict__.get("_trace_" + event):
            agent.__dict__["_trace_" + event] = True
            _note(event, name)

    _ice: dict = {}

    def _ice_agent_of():
        """The ICE steps traced from the first session on (the aioice names it needs are benchmarks/borrowed.py's,
        imported once the relay runs, not while aioice itself is imported): its ``ice_agent_of``; a checkout
        without them traces the rest."""
        if "agent_of" not in _ice:
            try:
                from benchmarks import borrowed

                borrowed.trace_ice_steps(_once)
                _ice["agent_of"] = borrowed.ice_agent_of
            except (ImportError, AttributeError):
                _ice["agent_of"] = lambda pc: None
        return _ice["agent_of"]

    _WRAP = {
        "signalling.whep": _wrap_whep,
        "relay.webrtc.sessions": _wrap_sessions,
        "relay.hub": _wrap_hub,
        "relay.webrtc.rtpsend": _wrap_send,
    }

    class _Finder(importlib.abc.MetaPathFinder):
        """Finds nothing itself: lets the others find a traced module, then wraps its loader's exec_module."""

        def find_spec(self, fullname, path, target=None):
            wrap = _WRAP.get(fullname)
            if wrap is None:
                return None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None and spec.loader is not None:
                    exec_module = spec.loader.exec_module

                    def traced_exec(module, exec_module=exec_module, wrap=wrap):
                        exec_module(module)
                        wrap(module)

                    spec.loader.exec_module = traced_exec
                    return spec
            return None

    sys.meta_path.insert(0, _Finder())
