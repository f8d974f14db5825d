"""The WebRTC edge: viewers over WHEP, publishing over WHIP, and what both send with.

- ``sessions``: a viewer's session per offer, and its freeing on every way out;
- ``shards``: the viewers' sessions in fan-out processes (``[webrtc] shards``), seen from the relay;
- ``shard``: one fan-out process (``python -m relay.webrtc.shard``): its hubs, fed by the relay, and its sessions;
- ``whip``: one stream pushed to a media server's WHIP endpoint;
- ``rtpsend``: the send path both use: a hub's frames onto an aiortc sender, per frame;
- ``udpbatch``: a socket's datagrams of one event-loop pass in one segmented write;
- ``ice``: STUN and TURN servers, minted TURN credentials, extra host candidates;
- ``borrowed``: every private aiortc and aioice name camrelay uses, and nothing else;
- ``whepclient``: a WHEP viewer for the tests and benchmarks.
"""
