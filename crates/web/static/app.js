// Basphere portal: copy buttons and live operation progress (Server-Sent Events).
// Plain script, no framework; the pages work without it except for live updates.
(function () {
  "use strict";

  function copyButtons() {
    document.querySelectorAll("button[data-copy]").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var el = document.getElementById(btn.getAttribute("data-copy"));
        if (!el) return;
        var text = el.textContent;
        var done = function (label) {
          var old = btn.textContent;
          btn.textContent = label;
          setTimeout(function () { btn.textContent = old; }, 1500);
        };
        var select = function () {
          var r = document.createRange();
          r.selectNodeContents(el);
          var s = window.getSelection();
          s.removeAllRanges();
          s.addRange(r);
          done("Press Ctrl+C");
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(function () { done("Copied"); }, select);
        } else {
          select();
        }
      });
    });
  }

  var STEP = {
    step_started: "running",
    step_done: "done",
    step_retry: "retrying",
    step_failed: "failed",
    step_undone: "undone"
  };
  var KINDS = ["started", "retried", "step_started", "step_done", "step_retry", "step_failed",
    "undo_started", "step_undone", "succeeded", "failed", "cancelled"];

  function setBadge(box, status) {
    var b = box.querySelector(".opstat .badge");
    if (!b) return;
    b.className = "badge s-" + status;
    b.textContent = status;
  }

  function follow(box) {
    var id = box.getAttribute("data-op");
    var es = new EventSource("/api/v1/operations/" + encodeURIComponent(id) + "/events");
    var msg = box.querySelector(".opmsg");
    var handle = function (e) {
      var ev;
      try { ev = JSON.parse(e.data); } catch (err) { return; }
      var kind = ev.kind || e.type;
      if (ev.step && STEP[kind]) {
        box.querySelectorAll("li[data-step]").forEach(function (li) {
          if (li.getAttribute("data-step") !== ev.step) return;
          li.className = "st-" + STEP[kind];
          var s = li.querySelector(".sstat");
          if (s) s.textContent = STEP[kind];
        });
      }
      if (kind === "started" || kind === "step_started" || kind === "retried") setBadge(box, "running");
      if (kind === "undo_started") setBadge(box, "undoing");
      if ((kind === "step_retry" || kind === "step_failed" || kind === "failed") && msg && ev.message) {
        msg.textContent = ev.message;
      }
      if (kind === "succeeded" || kind === "failed" || kind === "cancelled") {
        es.close();
        setBadge(box, kind);
        box.setAttribute("data-live", "false");
        if (!document.querySelector('.op[data-live="true"]')) {
          setTimeout(function () { window.location.reload(); }, 800);
        }
      }
    };
    KINDS.forEach(function (k) { es.addEventListener(k, handle); });
    window.addEventListener("pagehide", function () { es.close(); });
  }

  function init() {
    copyButtons();
    document.querySelectorAll('.op[data-live="true"]').forEach(follow);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
