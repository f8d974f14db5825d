"use strict";
// The viewer URL carries ?token= once; the cookie that set does the rest. Keep the token off the screen and out of
// the history.
if (new URLSearchParams(location.search).has("token")) {
  const url = new URL(location.href);
  url.searchParams.delete("token");
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
}
