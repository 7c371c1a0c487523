/* A poll's live page (/dashboard/polls/{id}): live bars (or the NPS / rating view) moving
 * with the poll's SSE stream, votes per minute, and — with an analyst or admin key — the
 * segment breakdown; an admin also closes, reopens and embeds the poll here.
 *
 * The live numbers never go back: totals are applied only when their `as_of` (the vote-log
 * sequence) is newer than what is shown, and the page repaints at most ten times a second
 * however fast totals come. Each answer's number is an element with `data-option` and
 * `data-count`, for tests and for people's own tooling. */
"use strict";

(function () {
  var el = Tally.el;
  var MIN_RENDER_MS = 100;
  var RATE_MINUTES = 60;
  var main = document.getElementById("main");
  var pollId = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop() || "");
  main.setAttribute("data-poll", pollId);

  var ballot = null;
  var shown = null; /* the results on screen */
  var waiting = null; /* newer results waiting for the next repaint */
  var renderTimer = null;
  var lastRender = 0;
  var rows = {}; /* answer id -> {fill, number, share} */
  var labels = {}; /* answer id -> label */
  var samples = []; /* [time ms, total votes] of the last minutes, for the rate */
  var buckets = {}; /* minute start ms -> votes seen live in that minute (no key) */
  var series = null; /* minute start ms -> votes, from /timeseries (with a key) */
  var stream = null;

  Tally.keyForm(function () {
    location.reload();
  });

  var streamState = document.getElementById("stream-state");
  function showStream(state, reason) {
    var text = {
      connecting: "Connecting…",
      live: "Live",
      reconnecting: "Reconnecting…",
      stopped: "Not live",
    }[state];
    streamState.textContent = text || state;
    streamState.setAttribute("data-stream", state);
    if (state === "stopped" && reason) hidden(reason);
  }

  function hidden(problem) {
    var note = document.getElementById("results-hidden");
    var detail = problem.detail || problem.message || "the results are not shown";
    if (problem.status === 401 || problem.slug === "results-hidden" || problem.status === 403) {
      detail += Tally.key() ? "" : " — an analyst key shows them.";
    }
    note.textContent = detail;
    note.hidden = false;
  }

  function setStatus(status) {
    var badge = document.getElementById("poll-status");
    badge.textContent = status;
    badge.className = "badge " + status;
    badge.setAttribute("data-status", status);
    var closing = status === "open" || status === "scheduled";
    document.getElementById("close-poll").hidden = !closing;
    document.getElementById("reopen-poll").hidden = closing || status === "archived";
  }

  /* --- the live view ------------------------------------------------------------------ */

  function answers() {
    if (ballot.kind === "single" || ballot.kind === "multi") return ballot.options;
    var list = [];
    for (var v = ballot.scale.min; v <= ballot.scale.max; v++) list.push({ id: String(v), label: String(v) });
    return list;
  }

  function npsGroup(value) {
    var n = Number(value);
    return n >= 9 ? "promoter" : n >= 7 ? "passive" : "detractor";
  }

  function buildBars() {
    var list = document.getElementById("bars");
    list.className = "bars " + ballot.kind;
    list.replaceChildren.apply(
      list,
      answers().map(function (answer) {
        labels[answer.id] = answer.label;
        var fill = el("span", { class: "fill" + (ballot.kind === "nps" ? " " + npsGroup(answer.id) : "") });
        var number = el("span", { class: "num", "data-option": answer.id, "data-count": "0", text: "0" });
        var share = el("span", { class: "share", text: "0.0%" });
        rows[answer.id] = { fill: fill, number: number, share: share };
        return el("li", { class: "bar-row" }, [
          el("span", { class: "label", text: answer.label }),
          el("span", { class: "meter", "aria-hidden": "true" }, [fill]),
          number,
          share,
        ]);
      })
    );
    if (ballot.kind === "nps" || ballot.kind === "rating") document.getElementById("score").hidden = false;
  }

  function renderScore(results) {
    var board = document.getElementById("score");
    if (results.nps) {
      var nps = results.nps;
      var score = nps.score === null || nps.score === undefined ? "–" : (nps.score > 0 ? "+" : "") + nps.score.toFixed(1);
      board.replaceChildren(
        el("p", { class: "score-main" }, [el("span", { class: "big", "data-score": "", text: score }), " NPS"]),
        el("p", { class: "score-parts" }, [
          el("span", { class: "promoter-text", text: Tally.count(nps.promoters) + " promoters" }),
          " · ",
          el("span", { text: Tally.count(nps.passives) + " passives" }),
          " · ",
          el("span", { class: "detractor-text", text: Tally.count(nps.detractors) + " detractors" }),
        ])
      );
    } else if (results.rating) {
      var mean = results.rating.mean;
      board.replaceChildren(
        el("p", { class: "score-main" }, [
          el("span", { class: "big", "data-score": "", text: mean === null || mean === undefined ? "–" : mean.toFixed(2) }),
          " average of " + ballot.scale.min + "–" + ballot.scale.max,
        ])
      );
    }
  }

  function render(results) {
    document.getElementById("total-votes").textContent = Tally.count(results.total_votes);
    document.getElementById("total-votes").setAttribute("data-total", String(results.total_votes));
    document.getElementById("unique-voters").textContent = Tally.count(results.unique_voters);
    document.getElementById("as-of").textContent = "as of #" + results.as_of;
    var most = 0;
    results.options.forEach(function (option) {
      most = Math.max(most, option.share);
    });
    results.options.forEach(function (option) {
      var row = rows[option.id];
      if (!row) return;
      row.number.textContent = Tally.count(option.count);
      row.number.setAttribute("data-count", String(option.count));
      row.share.textContent = Tally.percent(option.share);
      /* Bars are scaled to the leader, so small differences stay visible. */
      row.fill.style.width = (most > 0 ? (option.share / most) * 100 : 0).toFixed(1) + "%";
    });
    renderScore(results);
    if (results.status) setStatus(results.status);
  }

  /* Keeps `results` if newer than anything shown or waiting, and repaints at most every
   * MIN_RENDER_MS. */
  function offer(results) {
    var newest = waiting || shown;
    if (newest && results.as_of <= newest.as_of) return;
    waiting = results;
    noteRate(results);
    if (renderTimer) return;
    var wait = Math.max(0, MIN_RENDER_MS - (performance.now() - lastRender));
    renderTimer = setTimeout(function () {
      renderTimer = null;
      lastRender = performance.now();
      shown = waiting;
      waiting = null;
      render(shown);
      /* Counted from the end of a repaint, so repaints are at least MIN_RENDER_MS apart. */
      lastRender = performance.now();
      Tally.noteRender();
    }, wait);
  }

  /* --- votes per minute --------------------------------------------------------------- */

  function minute(ms) {
    return Math.floor(ms / 60000) * 60000;
  }

  function noteRate(results) {
    var now = Date.now();
    var last = samples.length ? samples[samples.length - 1] : null;
    samples.push([now, results.total_votes]);
    while (samples.length > 2 && samples[1][0] < now - 61000) samples.shift();
    if (last && results.total_votes > last[1]) {
      var key = minute(now);
      buckets[key] = (buckets[key] || 0) + (results.total_votes - last[1]);
    }
  }

  function rateNow() {
    if (samples.length < 2) return null;
    var first = samples[0];
    var last = samples[samples.length - 1];
    var seconds = (last[0] - first[0]) / 1000;
    if (seconds < 5) return null;
    return Math.round(((last[1] - first[1]) * 60) / seconds);
  }

  function drawChart() {
    var now = Date.now();
    var end = minute(now);
    var source = series || buckets;
    for (var key in buckets) {
      if (Number(key) < end - RATE_MINUTES * 60000) delete buckets[key];
    }
    var values = [];
    var most = 0;
    for (var i = RATE_MINUTES - 1; i >= 0; i--) {
      var value = source[end - i * 60000] || 0;
      values.push(value);
      most = Math.max(most, value);
    }
    var width = 600;
    var height = 120;
    var slot = width / RATE_MINUTES;
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + (height + 18));
    svg.setAttribute("role", "img");
    svg.setAttribute(
      "aria-label",
      "Votes per minute over the last hour: peak " + most + ", this minute " + values[values.length - 1]
    );
    values.forEach(function (value, i) {
      if (!value) return;
      var h = Math.max(1, (value / most) * height);
      var rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      rect.setAttribute("x", (i * slot + 1).toFixed(1));
      rect.setAttribute("y", (height - h).toFixed(1));
      rect.setAttribute("width", (slot - 2).toFixed(1));
      rect.setAttribute("height", h.toFixed(1));
      rect.setAttribute("class", "chart-bar");
      var title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = value + " votes, " + (RATE_MINUTES - 1 - i) + " min ago";
      rect.appendChild(title);
      svg.appendChild(rect);
    });
    [
      [0, "start", "60 min ago"],
      [width, "end", "now"],
    ].forEach(function (axis) {
      var text = document.createElementNS("http://www.w3.org/2000/svg", "text");
      text.setAttribute("x", axis[0]);
      text.setAttribute("y", height + 14);
      text.setAttribute("text-anchor", axis[1]);
      text.setAttribute("class", "chart-axis");
      text.textContent = axis[2];
      svg.appendChild(text);
    });
    var peak = document.createElementNS("http://www.w3.org/2000/svg", "text");
    peak.setAttribute("x", 2);
    peak.setAttribute("y", 10);
    peak.setAttribute("class", "chart-axis");
    peak.textContent = most ? "peak " + most + "/min" : "no votes yet";
    svg.appendChild(peak);
    document.getElementById("rate-chart").replaceChildren(svg);
    var rate = rateNow();
    document.getElementById("rate-now").textContent = rate === null ? "–" : Tally.count(rate);
  }

  function loadSeries() {
    var from = minute(Date.now()) - (RATE_MINUTES - 1) * 60000;
    Tally.api("/v1/polls/" + encodeURIComponent(pollId) + "/timeseries?step=1m&from=" + from).then(
      function (doc) {
        var sums = {};
        doc.points.forEach(function (point) {
          var total = 0;
          Object.keys(point.options).forEach(function (option) {
            total += point.options[option];
          });
          sums[Date.parse(point.t)] = total;
        });
        series = sums;
        document.getElementById("rate-note").textContent =
          ballot.kind === "multi" ? "Answers per minute (a multi-choice ballot counts once per answer)." : "Counted votes per minute, from the warehouse.";
        drawChart();
      },
      function () {
        series = null;
      }
    );
  }

  /* --- segments ----------------------------------------------------------------------- */

  var breakdownForm = document.getElementById("breakdown-form");
  // Rows a breakdown table shows at most (the API answers up to 10,002 groups).
  var BREAKDOWN_ROWS_SHOWN = 500;
  var breakdownBox = document.getElementById("breakdown");
  var range = document.getElementById("range");

  function escapeWhere(value) {
    return value.replace(/\\/g, "\\\\").replace(/,/g, "\\,");
  }

  function breakdownQuery() {
    var by = [document.getElementById("by").value.trim(), document.getElementById("by2").value.trim()].filter(Boolean);
    var params = ["by=" + encodeURIComponent(by.join(","))];
    var whereKey = document.getElementById("where-key").value.trim();
    var whereValues = document
      .getElementById("where-value")
      .value.split(",")
      .map(function (v) {
        return v.trim();
      })
      .filter(Boolean);
    if (whereKey && whereValues.length) {
      params.push(
        "where=" +
          encodeURIComponent(
            whereValues
              .map(function (v) {
                return whereKey + ":" + escapeWhere(v);
              })
              .join(",")
          )
      );
    }
    if (range.value === "custom") {
      var from = document.getElementById("from").value;
      var to = document.getElementById("to").value;
      if (from) params.push("from=" + new Date(from).getTime());
      if (to) params.push("to=" + new Date(to).getTime());
    } else if (range.value) {
      params.push("from=" + (Date.now() - Number(range.value) * 1000));
    }
    return params.join("&");
  }

  function pValue(p) {
    if (p === null || p === undefined) return "–";
    return p < 0.001 ? "< 0.001" : p.toFixed(3);
  }

  function renderBreakdown(doc) {
    var ids = answers().map(function (a) {
      return a.id;
    });
    var head = el("tr", {}, [
      el("th", { scope: "col", text: "Segment" }),
      el("th", { scope: "col", class: "n", text: "Votes" }),
    ]
      .concat(
        ids.map(function (id) {
          return el("th", { scope: "col", class: "n", text: labels[id] });
        })
      )
      .concat([el("th", { scope: "col", class: "n", text: "p" }), el("th", { scope: "col", text: "Flag" })]));
    // Largest groups first; a dimension of thousands of values shows its largest ones only.
    var shown = doc.groups.slice(0, BREAKDOWN_ROWS_SHOWN);
    var body = shown.map(function (group) {
      var name = doc.by
        .map(function (key) {
          return key + "=" + group.segment[key];
        })
        .join(", ");
      var byId = {};
      group.options.forEach(function (option) {
        byId[option.id] = option;
      });
      var flags = [];
      if (group.differs) flags.push(el("span", { class: "flag differs", title: "differs from the rest of the selection (p < 0.05 after the Benjamini–Hochberg correction across groups)", text: "differs" }));
      if (group.small_sample) flags.push(el("span", { class: "flag small", title: "fewer than 10 votes or an expected count below 5: do not trust the shares or the test", text: "small sample" }));
      return el(
        "tr",
        { "data-segment": name, "data-differs": String(group.differs), "data-small-sample": String(group.small_sample) },
        [
          el("th", { scope: "row", text: doc.by.map(function (key) { return group.segment[key]; }).join(" · ") }),
          el("td", { class: "n", "data-breakdown-total": String(group.total_votes), text: Tally.count(group.total_votes) }),
        ]
          .concat(
            ids.map(function (id) {
              var option = byId[id] || { count: 0, share: 0, ci95: null };
              var ci = option.ci95 ? Tally.percent(option.ci95[0], 0) + "–" + Tally.percent(option.ci95[1], 0) : "";
              return el(
                "td",
                {
                  class: "n",
                  "data-breakdown-option": id,
                  "data-breakdown-count": String(option.count),
                  "data-breakdown-share": String(option.share),
                  title: option.count + " votes" + (ci ? ", 95% interval " + ci : ""),
                },
                [el("span", { class: "cell-share", text: Tally.percent(option.share) }), el("span", { class: "ci", text: ci })]
              );
            })
          )
          .concat([
            el("td", { class: "n", "data-p-value": group.p_value === null ? "" : String(group.p_value), text: pValue(group.p_value) }),
            el("td", {}, flags),
          ])
      );
    });
    var table = el("table", { class: "breakdown", "data-as-of": String(doc.as_of) }, [
      el("caption", {
        text:
          "By " + doc.by.join(" and ") + ": " + Tally.count(doc.total_votes) + " votes, " + Tally.count(doc.groups.length) +
          " groups" + (shown.length < doc.groups.length ? " (the " + Tally.count(shown.length) + " largest shown)" : "") +
          " · shares with 95% intervals · " + doc.test + " test of each group against the rest · as of #" + doc.as_of,
      }),
      el("thead", {}, [head]),
      el("tbody", {}, body),
    ]);
    breakdownBox.replaceChildren(table);
    if (!doc.groups.length) breakdownBox.appendChild(el("p", { class: "help", text: "No votes in this selection." }));
    breakdownBox.hidden = false;
  }

  var breakdownBusy = false;
  function loadBreakdown() {
    if (breakdownBusy) return;
    breakdownBusy = true;
    Tally.api("/v1/polls/" + encodeURIComponent(pollId) + "/breakdown?" + breakdownQuery()).then(
      function (doc) {
        breakdownBusy = false;
        renderBreakdown(doc);
      },
      function (error) {
        breakdownBusy = false;
        breakdownBox.hidden = false;
        breakdownBox.replaceChildren(el("p", { class: "notice error", text: error.message }));
      }
    );
  }

  range.addEventListener("change", function () {
    document.getElementById("custom-range").hidden = range.value !== "custom";
  });
  breakdownForm.addEventListener("submit", function (event) {
    event.preventDefault();
    loadBreakdown();
  });

  /* --- managing ----------------------------------------------------------------------- */

  function embedCode() {
    var base = Tally.url("");
    var ingest = document.getElementById("ingest-base").value.trim().replace(/\/+$/, "");
    var code =
      '<script src="' + base + '/widget.js" data-poll="' + pollId + '"' + (ingest && ingest !== base ? ' data-ingest="' + ingest + '"' : "") + " async></script>";
    document.getElementById("embed-code").value = code;
  }

  function manage(poll) {
    document.getElementById("manage").hidden = false;
    document.getElementById("origins").value = (poll.allowed_origins || []).join("\n");
    var ingest = document.getElementById("ingest-base");
    try {
      ingest.value = localStorage.getItem("tally.ingest") || Tally.url("");
    } catch (e) {
      ingest.value = Tally.url("");
    }
    ingest.addEventListener("input", function () {
      try {
        localStorage.setItem("tally.ingest", ingest.value.trim());
      } catch (e) {
        /* not kept */
      }
      embedCode();
    });
    embedCode();
    ["close", "reopen"].forEach(function (action) {
      document.getElementById(action + "-poll").addEventListener("click", function (event) {
        var button = event.currentTarget;
        button.disabled = true;
        Tally.api("/v1/polls/" + encodeURIComponent(pollId) + "/" + action, { method: "POST" }).then(
          function (updated) {
            button.disabled = false;
            setStatus(updated.status);
            Tally.say("The poll is " + updated.status + ".", "ok");
          },
          function (error) {
            button.disabled = false;
            Tally.say(error.message, "error");
          }
        );
      });
    });
    document.getElementById("origins-form").addEventListener("submit", function (event) {
      event.preventDefault();
      var origins = document
        .getElementById("origins")
        .value.split("\n")
        .map(function (line) {
          return line.trim();
        })
        .filter(Boolean);
      Tally.api("/v1/polls/" + encodeURIComponent(pollId), { method: "PATCH", body: { allowed_origins: origins } }).then(
        function (updated) {
          document.getElementById("origins").value = (updated.allowed_origins || []).join("\n");
          Tally.say("Saved: " + (origins.length ? origins.length + " site(s) may embed this poll." : "no other site may embed this poll."), "ok");
        },
        function (error) {
          Tally.say(error.message, "error");
        }
      );
    });
    if (poll.campaign) {
      document.getElementById("crumb-campaign").textContent = "› " + poll.campaign;
    }
    var keys = document.getElementById("segment-keys");
    (poll.dimensions || []).forEach(function (dimension) {
      keys.appendChild(el("option", { value: dimension }));
    });
  }

  /* --- start ------------------------------------------------------------------------ */

  function start() {
    document.title = ballot.title + " · tally";
    document.getElementById("poll-title").textContent = ballot.title;
    document.getElementById("poll-question").textContent = ballot.question;
    document.getElementById("poll-meta").textContent = pollId + " · " + ballot.kind;
    setStatus(ballot.status);
    buildBars();
    stream = Tally.stream("/v1/polls/" + encodeURIComponent(pollId) + "/live", {
      onStatus: showStream,
      onEvent: function (type, data) {
        if (type === "snapshot" || type === "totals") offer(data);
        else if (type === "closed") setStatus(data.status);
        else if (type === "hidden") {
          hidden({ detail: data.detail });
          stream.close();
          showStream("stopped");
        }
      },
    });
    drawChart();
    setInterval(drawChart, 5000);
    var role = Tally.role();
    if (role) {
      document.getElementById("segments-help").hidden = true;
      breakdownForm.hidden = false;
      loadBreakdown();
      loadSeries();
      setInterval(loadSeries, 30000);
      setInterval(function () {
        if (document.getElementById("auto").checked && !document.hidden) loadBreakdown();
      }, 10000);
    } else {
      document.getElementById("rate-note").textContent = "Votes seen by this page since it opened; an analyst key shows the full hour.";
    }
    if (role === "admin") {
      Tally.api("/v1/polls/" + encodeURIComponent(pollId)).then(manage, function (error) {
        Tally.say(error.message, "error");
      });
    }
  }

  Tally.api("/v1/polls/" + encodeURIComponent(pollId) + "/ballot", { auth: false }).then(
    function (answer) {
      ballot = answer;
      start();
    },
    function (error) {
      document.getElementById("poll-title").textContent = error.status === 404 ? "No such poll" : "Poll unavailable";
      document.getElementById("poll-question").textContent = error.message;
      showStream("stopped");
    }
  );
})();
