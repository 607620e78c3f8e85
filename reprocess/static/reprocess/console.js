/* Console behaviour: expandable batch summaries, reprocess progress polling. No framework. */
(function () {
  "use strict";

  // The expand icon is a link to the batch's page; with the script, the batch's summary
  // opens in place under the row instead.
  function toggleSummary(button) {
    var row = button.closest("tr");
    var next = row.nextElementSibling;
    if (next && next.classList.contains("summary-row")) {
      next.remove();
      button.setAttribute("aria-expanded", "false");
      return;
    }
    var summary = document.createElement("tr");
    summary.className = "summary-row";
    var cell = document.createElement("td");
    cell.colSpan = row.children.length;
    cell.textContent = "Loading…";
    summary.appendChild(cell);
    row.after(summary);
    button.setAttribute("aria-expanded", "true");
    fetch(button.dataset.fragment, { credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) { cell.innerHTML = html; })
      .catch(function (err) { cell.textContent = "Could not load the summary (" + err.message + ")."; });
  }

  function pollProgress(box) {
    var timer = setInterval(function () {
      fetch(box.dataset.url, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(new Error(r.status)); })
        .then(function (html) {
          box.innerHTML = html;
          var state = box.querySelector("[data-finished]");
          if (state && state.dataset.finished === "1") {
            clearInterval(timer);
            // Reload the table: what the run processed disappears from the view.
            var url = new URL(window.location.href);
            url.searchParams.delete("run");
            setTimeout(function () { window.location.assign(url.toString()); }, 1500);
          }
        })
        .catch(function () { clearInterval(timer); });
    }, 3000);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest(".js-expand");
    if (button && !event.ctrlKey && !event.metaKey && !event.shiftKey) {
      event.preventDefault();
      toggleSummary(button);
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.querySelector(".js-progress");
    if (box && box.querySelector("[data-finished='0']")) { pollProgress(box); }
    // #batch-12 in the address opens that batch's summary (a link to an expanded row).
    var match = /^#batch-(\d+)$/.exec(window.location.hash);
    var row = match && document.querySelector("tr[data-batch-id='" + match[1] + "']");
    if (row) { toggleSummary(row.querySelector(".js-expand")); }
  });
})();
