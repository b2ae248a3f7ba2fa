// The labeling page. Model text is only ever set with textContent: it is shown, never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const token = document.querySelector('meta[name="label-token"]').content;
  const CHOICE_NAMES = { A: "A is better", B: "B is better", tie: "a tie", skip: "skip" };

  const randomId = () => {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };

  // one client id per page load: a duplicated tab is another page and gets another item (a page going away gives
  // its item back, see pagehide below)
  const client = randomId();

  let labeler = "";
  let current = null; // the pair shown: {id, prompt, a, b, identical}
  let labelId = null; // one id per shown pair, so a retried submit is saved once
  let choice = null;
  let busy = false;
  let pollTimer = null;

  const api = async (path, body) => {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Label-Token": token },
      body: JSON.stringify(body),
    });
    let data;
    try {
      data = await response.json();
    } catch (e) {
      data = { error: `the server answered ${response.status}` };
    }
    if (!response.ok) {
      const error = new Error(data.error || `the server answered ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  };

  const notice = (text, kind) => {
    const box = $("notice");
    box.textContent = text || "";
    box.className = kind || "";
  };

  const showProgress = (progress) => {
    if (!progress) return;
    let text = `${progress.labeled} / ${progress.total} labeled`;
    if (labeler) text += ` · ${progress.mine} by you`;
    $("progress").textContent = text;
  };

  const select = (value) => {
    if (!current) return;
    choice = value;
    document.querySelectorAll("[data-choice]").forEach((button) => {
      button.setAttribute("aria-pressed", String(button.dataset.choice === value));
    });
    $("side-A").classList.toggle("picked", value === "A");
    $("side-B").classList.toggle("picked", value === "B");
  };

  const showPair = (pair, comment) => {
    current = pair;
    labelId = randomId();
    $("prompt").textContent = pair.prompt;
    $("text-a").textContent = pair.a;
    $("text-b").textContent = pair.b;
    $("identical").hidden = !pair.identical;
    $("comment").value = comment || "";
    $("pair").hidden = false;
    $("status").hidden = true;
    $("submit").disabled = false;
    select(null);
    choice = null;
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  };

  const showStatus = (text) => {
    current = null;
    $("pair").hidden = true;
    $("status").hidden = false;
    $("status").textContent = text;
    $("submit").disabled = true;
  };

  const schedule = (ms) => {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(next, ms);
  };

  const handle = (answer, comment) => {
    showProgress(answer.progress);
    if (answer.status === "item") {
      if (!current || current.id !== answer.pair.id) showPair(answer.pair, comment);
    } else if (answer.status === "preparing") {
      showStatus(answer.message);
      schedule(400);
    } else if (answer.status === "waiting") {
      showStatus(answer.message);
      schedule(3000);
    } else if (answer.status === "done") {
      showStatus(answer.message);
    } else if (answer.status === "undone") {
      next();
    }
  };

  async function next() {
    clearTimeout(pollTimer);
    try {
      handle(await api("/api/next", { client, labeler }));
    } catch (error) {
      notice(`could not get the next item: ${error.message}`, "error");
      if (!error.status || error.status >= 500) schedule(3000);
    }
  }

  const submit = async () => {
    if (!current || busy) return;
    if (!choice) {
      notice("pick A, B, tie or skip first (keys 1, 2, 3, s)", "error");
      return;
    }
    busy = true;
    const body = { pair: current.id, choice, comment: $("comment").value, label_id: labelId, labeler, client };
    try {
      const answer = await api("/api/label", body);
      showProgress(answer.progress);
      notice(`saved: ${CHOICE_NAMES[choice]}`, "ok");
      current = null;
      await next();
    } catch (error) {
      if (error.status === 404 || error.status === 409) {
        notice(`not saved: ${error.message}`, "error");
        current = null;
        await next();
      } else {
        notice(`not saved: ${error.message}; press Enter to try again`, "error");
      }
    } finally {
      busy = false;
    }
  };

  const undo = async () => {
    if (busy) return;
    busy = true;
    try {
      const answer = await api("/api/undo", { client, labeler });
      const was = answer.undone ? CHOICE_NAMES[answer.undone.choice] : "";
      current = null;
      handle(answer, answer.undone ? answer.undone.comment : "");
      notice(answer.message || `undone: your last label (${was}) is removed; label this prompt again`, "ok");
    } catch (error) {
      notice(`undo: ${error.message}`, "error");
    } finally {
      busy = false;
    }
  };

  const start = (event) => {
    event.preventDefault();
    labeler = $("labeler").value.trim();
    if (!labeler) return;
    localStorage.setItem("tunelab-label-labeler", labeler);
    $("intro").hidden = true;
    $("labeling").hidden = false;
    next();
  };

  const keys = { 1: "A", 2: "B", 3: "tie", s: "skip", S: "skip" };
  document.addEventListener("keydown", (event) => {
    if ($("labeling").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target && target.id === "comment") {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        submit();
      }
      return;
    }
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
    if (event.key in keys) {
      event.preventDefault();
      select(keys[event.key]);
    } else if (event.key === "Enter") {
      event.preventDefault();
      submit();
    } else if (event.key === "u" || event.key === "U") {
      event.preventDefault();
      undo();
    }
  });

  document.querySelectorAll("[data-choice]").forEach((button) => {
    button.addEventListener("click", () => select(button.dataset.choice));
  });
  $("submit").addEventListener("click", submit);
  $("undo").addEventListener("click", undo);
  $("start-form").addEventListener("submit", start);

  // keep this page's item while it is open (a lease left alone expires), and give it back when the tab closes
  setInterval(() => {
    if (current && !busy && !document.hidden) next();
  }, 60000);
  window.addEventListener("pagehide", () => {
    if (!labeler) return;
    fetch("/api/release", {
      method: "POST", keepalive: true,
      headers: { "Content-Type": "application/json", "X-Label-Token": token },
      body: JSON.stringify({ client }),
    }).catch(() => {});
  });

  fetch("/api/state").then((r) => r.json()).then((state) => {
    // the guidelines come rendered by the server from Markdown with raw HTML escaped
    $("guidelines").innerHTML = state.guidelines_html;
    document.querySelector("#guidelines-again .guidelines").innerHTML = state.guidelines_html;
    $("labeler").value = localStorage.getItem("tunelab-label-labeler") || state.labeler || "";
    showProgress(state.progress);
    $("start").focus();
  }).catch((error) => notice(`cannot reach the server: ${error.message}`, "error"));
})();
