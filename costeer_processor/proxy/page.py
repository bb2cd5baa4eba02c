"""The page at ``/``: pick a profile, ask something, watch the steered answer stream next to the large model's own.

Plain HTML and JavaScript (no build step, nothing fetched from elsewhere). Both answers are
requested from this proxy's ``/v1/chat/completions`` with ``stream: true``: the steered one with
the chosen profile (``X-CoSteer-Profile``) or an inline context, the other with
``costeer_plain: true`` (the large model alone; no context involved). Text is inserted with
``textContent`` only. Query parameters ``profile``, ``q``, ``max_tokens``, ``temperature`` and
``autorun=1`` fill the form and ask at once (used by the browser test and for screenshots).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CoSteer proxy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:12px 24px}
 header h1{font-size:18px;margin:0} header p{margin:2px 0 0;color:#b9c0cf;font-size:13px}
 main{padding:16px 24px;max-width:1200px}
 .row{display:flex;gap:12px;flex-wrap:wrap;align-items:end;margin-bottom:12px}
 label{display:flex;flex-direction:column;font-size:12px;color:#4a5366;gap:3px}
 select,input,textarea{font:inherit;padding:6px 8px;border:1px solid #c5cbd6;border-radius:6px;background:#fff}
 textarea{width:100%;box-sizing:border-box} #q{min-height:54px}
 button{font:inherit;padding:8px 18px;border:0;border-radius:6px;background:#2f6fed;color:#fff;cursor:pointer}
 button:disabled{background:#9bb5ee}
 .panes{display:grid;grid-template-columns:1fr 1fr;gap:16px}
 .pane{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 14px;min-height:160px}
 .pane h2{font-size:14px;margin:0 0 8px} .steered h2{color:#2f6fed} .plain h2{color:#6b7385}
 .out{white-space:pre-wrap;word-break:break-word} .meta{font-size:12px;color:#6b7385;margin-top:8px}
 .err{color:#c62828} [hidden]{display:none!important}
</style></head><body>
<header><h1>CoSteer proxy</h1>
<p>The personal context stays on this device; the large model upstream sees the question and the answer tokens only.</p></header>
<main>
<div class="row">
 <label>Profile<select id="profile"></select></label>
 <label>Max tokens<input id="max_tokens" type="number" min="1" value="128" style="width:90px"></label>
 <label>Temperature<input id="temperature" type="number" min="0" max="2" step="0.1" value="0" style="width:90px"></label>
 <label>API key (if set)<input id="key" type="password" style="width:160px"></label>
</div>
<div class="row" id="inline_row" hidden><label style="flex:1">Inline context (not saved, sent to this proxy only)
 <textarea id="inline" rows="2"></textarea></label></div>
<div class="row"><label style="flex:1">Ask something<textarea id="q">Suggest a dinner for tonight.</textarea></label>
 <button id="ask">Ask</button></div>
<div class="panes">
 <section class="pane steered"><h2>CoSteer (steered by <span id="who">the profile</span>)</h2>
  <div class="out" id="steered"></div><div class="meta" id="steered_meta"></div></section>
 <section class="pane plain"><h2>Large model alone</h2>
  <div class="out" id="plain"></div><div class="meta" id="plain_meta"></div></section>
</div></main>
<script>
const $ = id => document.getElementById(id);
const params = new URLSearchParams(location.search);
function headers(extra) {
  const h = {"Content-Type": "application/json", ...extra};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function loadProfiles() {
  const sel = $("profile"), keep = sel.value;
  sel.replaceChildren();
  let names = [], def = null;
  try {
    const r = await fetch("/v1/costeer/profiles", {headers: headers({})});
    if (r.ok) { const j = await r.json(); names = j.profiles; def = j.default; }
  } catch (e) {}
  for (const n of names) { const o = document.createElement("option"); o.value = n; o.textContent = n; sel.appendChild(o); }
  const o = document.createElement("option"); o.value = ""; o.textContent = "(inline context)"; sel.appendChild(o);
  const want = keep || (params.get("profile") ?? def);
  if (want !== null && [...sel.options].some(x => x.value === want)) sel.value = want;
  $("inline_row").hidden = sel.value !== "";
}
$("profile").addEventListener("change", () => { $("inline_row").hidden = $("profile").value !== ""; });
async function run(target, body, extraHeaders) {
  const out = $(target), meta = $(target + "_meta");
  out.textContent = ""; meta.textContent = "waiting..."; meta.className = "meta";
  const t0 = performance.now(); let chunks = 0, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(extraHeaders),
                                                  body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}})});
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error((j.error && j.error.message) || ("HTTP " + r.status)); }
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\\n\\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const data = ev.slice(6); if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.usage) usage = j.usage;
        for (const c of j.choices || []) { if (c.delta && c.delta.content) { out.textContent += c.delta.content; chunks++; } }
        meta.textContent = chunks + " chunks, " + ((performance.now() - t0) / 1000).toFixed(1) + " s";
      }
    }
    meta.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + ((performance.now() - t0) / 1000).toFixed(1) + " s";
    out.dataset.done = "1";
  } catch (e) {
    meta.textContent = "error: " + e.message; meta.className = "meta err"; out.dataset.done = "error";
  }
}
async function ask() {
  $("ask").disabled = true;
  const q = $("q").value, prof = $("profile").value;
  const base = {messages: [{role: "user", content: q}], max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value)};
  $("who").textContent = prof ? "profile " + prof : "the inline context";
  const steered = prof ? run("steered", base, {"X-CoSteer-Profile": prof})
                       : run("steered", {...base, costeer_context: $("inline").value}, {});
  await Promise.all([steered, run("plain", {...base, costeer_plain: true}, {})]);
  $("ask").disabled = false; document.body.dataset.done = "1";
}
$("ask").addEventListener("click", ask);
$("key").addEventListener("change", loadProfiles);  // with an API key, the names need it too
for (const k of ["q", "max_tokens", "temperature"]) if (params.get(k) !== null) $(k).value = params.get(k);
loadProfiles().then(() => { if (params.get("autorun") === "1") ask(); });
</script></body></html>
"""
