/* The campaign overview (/dashboard/): with an admin key, every poll grouped by campaign
 * with its status and live totals — all of them over one multi-poll stream
 * (/v1/live?polls=…; a browser opens at most six connections to a site) — and the admin's
 * create, close and reopen. Without a key: open a poll's live page by id. */
"use strict";

(function () {
  var el = Tally.el;
  var STREAM_POLLS = 100; /* polls one stream carries (the server's cap) */
  var MAX_SHOWN = 300; /* polls shown at once: three streams at most */
  var MIN_RENDER_MS = 100; /* at most ten updates a second */

  var polls = []; /* the poll documents listed, in id order */
  var cards = {}; /* poll id -> {card, results, parts} */
  var streams = [];
  var streamKey = "";
  var pending = {};
  var renderTimer = null;
  var lastRender = 0;

  var groupsBox = document.getElementById("groups");
  var filters = document.getElementById("filters");
  var campaignFilter = document.getElementById("filter-campaign");
  var statusFilter = document.getElementById("filter-status");
  var textFilter = document.getElementById("filter-text");
  var streamState = document.getElementById("stream-state");

  document.getElementById("open-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var id = document.getElementById("open-id").value.trim();
    if (id) location.href = "polls/" + encodeURIComponent(id);
  });

  function showStream(state, reason) {
    var text = {
      idle: "Not connected",
      connecting: "Connecting…",
      live: "Live",
      reconnecting: "Reconnecting…",
      stopped: "Stopped" + (reason ? ": " + reason.message : ""),
    }[state];
    streamState.textContent = text || state;
    streamState.setAttribute("data-stream", state);
  }

  function stopStreams() {
    streams.forEach(function (s) {
      s.close();
    });
    streams = [];
    streamKey = "";
    showStream("idle");
  }

  function listAll() {
    var all = [];
    function page(after, left) {
      var path = "/v1/polls?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
      return Tally.api(path).then(function (answer) {
        all = all.concat(answer.polls);
        if (answer.next && left > 1) return page(answer.next, left - 1);
        return all;
      });
    }
    return page(null, 10);
  }

  function campaignOf(poll) {
    return poll.campaign || "";
  }

  function shown() {
    var campaign = campaignFilter.value;
    var status = statusFilter.value;
    var text = textFilter.value.trim().toLowerCase();
    return polls.filter(function (poll) {
      if (campaign && campaignOf(poll) !== campaign) return false;
      if (status === "active" && poll.status !== "open" && poll.status !== "scheduled") return false;
      if (status && status !== "active" && poll.status !== status) return false;
      if (text && poll.id.indexOf(text) < 0 && poll.title.toLowerCase().indexOf(text) < 0) return false;
      return true;
    });
  }

  function statusBadge(status) {
    return el("span", { class: "badge " + status, "data-status": status, text: status });
  }

  function actionButton(poll) {
    var closing = poll.status === "open" || poll.status === "scheduled";
    if (poll.status === "archived") return null;
    /* Its votes left the vote log: it can never take votes again (reopening is refused). */
    if (!closing && poll.log_purged_at) return null;
    return el("button", {
      type: "button",
      class: "quiet",
      "data-action": closing ? "close" : "reopen",
      "aria-label": (closing ? "Close " : "Reopen ") + poll.title,
      text: closing ? "Close" : "Reopen",
      on: {
        click: function (event) {
          changeStatus(poll, closing ? "close" : "reopen", event.currentTarget);
        },
      },
    });
  }

  function changeStatus(poll, action, button) {
    button.disabled = true;
    Tally.api("/v1/polls/" + encodeURIComponent(poll.id) + "/" + action, { method: "POST" }).then(
      function (updated) {
        replacePoll(updated);
        Tally.say("“" + updated.title + "” is " + updated.status + ".", "ok");
      },
      function (error) {
        button.disabled = false;
        Tally.say(error.message, "error");
      }
    );
  }

  /* A poll's record changed (status): its card is made again, keeping the numbers shown. */
  function replacePoll(updated) {
    for (var i = 0; i < polls.length; i++) {
      if (polls[i].id === updated.id) polls[i] = updated;
    }
    var old = cards[updated.id];
    delete cards[updated.id];
    render();
    if (old && old.results && cards[updated.id]) update(cards[updated.id], old.results);
  }

  function card(poll) {
    var total = el("span", { class: "big", "data-total": "0", text: "0" });
    var options = {};
    var list = null;
    var score = null;
    if (poll.kind === "single" || poll.kind === "multi") {
      list = el(
        "ul",
        { class: "mini", "aria-label": "Votes per option" },
        poll.options.map(function (option) {
          var bar = el("span", { class: "fill" });
          var number = el("span", { class: "num", "data-option": option.id, "data-count": "0", text: "0" });
          options[option.id] = { bar: bar, number: number };
          return el("li", {}, [
            el("span", { class: "label", text: option.label }),
            el("span", { class: "meter", "aria-hidden": "true" }, [bar]),
            number,
          ]);
        })
      );
    } else {
      score = el("strong", { "data-score": "", text: "–" });
    }
    var link = el("a", { href: "polls/" + encodeURIComponent(poll.id), text: poll.title });
    var node = el("article", { class: "card", "data-poll": poll.id, "data-status": poll.status }, [
      el("header", {}, [el("h3", {}, [link]), statusBadge(poll.status)]),
      el("p", { class: "meta", text: poll.id + " · " + poll.kind }),
      el("p", { class: "total" }, [total, " votes"]),
      list,
      score ? el("p", { class: "score" }, [poll.kind === "nps" ? "NPS " : "Average ", score]) : null,
      Tally.role() === "admin" ? el("div", { class: "card-actions" }, [actionButton(poll)]) : null,
    ]);
    return { node: node, total: total, options: options, score: score, results: null, poll: poll };
  }

  /* Moves a card's numbers to `results`, unless the card already shows newer ones. */
  function update(entry, results) {
    if (entry.results && results.as_of <= entry.results.as_of) return;
    entry.results = results;
    entry.total.textContent = Tally.count(results.total_votes);
    entry.total.setAttribute("data-total", String(results.total_votes));
    (results.options || []).forEach(function (option) {
      var shown = entry.options[option.id];
      if (!shown) return;
      shown.number.textContent = Tally.count(option.count);
      shown.number.setAttribute("data-count", String(option.count));
      shown.bar.style.width = Math.round(option.share * 1000) / 10 + "%";
    });
    if (entry.score) {
      var value = results.nps ? results.nps.score : results.rating ? results.rating.mean : null;
      entry.score.textContent = value === null || value === undefined ? "–" : value.toFixed(1);
    }
  }

  function render() {
    var visible = shown().slice(0, MAX_SHOWN);
    var byCampaign = {};
    visible.forEach(function (poll) {
      var name = campaignOf(poll);
      (byCampaign[name] = byCampaign[name] || []).push(poll);
    });
    var names = Object.keys(byCampaign).sort(function (a, b) {
      if (!a) return 1;
      if (!b) return -1;
      return a.localeCompare(b);
    });
    var groups = names.map(function (name) {
      var section = el("section", { class: "group", "data-campaign": name, "aria-label": name ? "Campaign " + name : "Polls without a campaign" }, [
        el("h2", { text: name || "No campaign" }),
      ]);
      var grid = el("div", { class: "cards" });
      byCampaign[name].forEach(function (poll) {
        var entry = cards[poll.id] || (cards[poll.id] = card(poll));
        grid.appendChild(entry.node);
      });
      section.appendChild(grid);
      return section;
    });
    groupsBox.replaceChildren.apply(groupsBox, groups);
    if (!visible.length) {
      groupsBox.appendChild(el("p", { class: "help", text: polls.length ? "No poll matches these filters." : "No polls yet." }));
    }
    if (shown().length > MAX_SHOWN) {
      groupsBox.appendChild(el("p", { class: "help", text: "Showing the first " + MAX_SHOWN + " polls; choose a campaign to see the rest." }));
    }
    follow(visible.map(function (poll) {
      return poll.id;
    }));
  }

  /* One stream per 100 shown polls, reopened only when the set of shown polls changes. */
  function follow(ids) {
    var wanted = ids.join(",");
    if (wanted === streamKey) return;
    stopStreams();
    streamKey = wanted;
    var states = [];
    for (var start = 0; start < ids.length; start += STREAM_POLLS) {
      (function (index, chunk) {
        states[index] = "connecting";
        streams.push(
          Tally.stream("/v1/live?polls=" + chunk.map(encodeURIComponent).join(","), {
            onStatus: function (state, reason) {
              states[index] = state;
              /* The worst state of the streams is the page's. */
              var order = ["stopped", "reconnecting", "connecting", "live"];
              var worst = states.reduce(function (a, b) {
                return order.indexOf(a) < order.indexOf(b) ? a : b;
              });
              showStream(worst, reason);
            },
            onEvent: onEvent,
          })
        );
      })(start / STREAM_POLLS, ids.slice(start, start + STREAM_POLLS));
    }
  }

  function onEvent(type, data) {
    if (type === "snapshot" || type === "totals") {
      (data.polls || []).forEach(function (results) {
        var known = pending[results.poll_id];
        if (!known || results.as_of > known.as_of) pending[results.poll_id] = results;
      });
      schedule();
    } else if (type === "closed" || type === "hidden") {
      polls.forEach(function (poll) {
        if (poll.id === data.poll_id && type === "closed" && poll.status !== data.status) {
          replacePoll(Object.assign({}, poll, { status: data.status }));
        }
      });
    }
  }

  /* Updates are coalesced: at most one repaint per MIN_RENDER_MS. */
  function schedule() {
    if (renderTimer) return;
    var wait = Math.max(0, MIN_RENDER_MS - (performance.now() - lastRender));
    renderTimer = setTimeout(function () {
      renderTimer = null;
      lastRender = performance.now();
      var batch = pending;
      pending = {};
      Object.keys(batch).forEach(function (id) {
        if (cards[id]) update(cards[id], batch[id]);
      });
      lastRender = performance.now();
      Tally.noteRender();
    }, wait);
  }

  function fillCampaigns() {
    var names = {};
    polls.forEach(function (poll) {
      if (poll.campaign) names[poll.campaign] = true;
    });
    var current = campaignFilter.value;
    var sorted = Object.keys(names).sort();
    campaignFilter.replaceChildren(
      el("option", { value: "", text: "All campaigns" }),
      ...sorted.map(function (name) {
        return el("option", { value: name, text: name, selected: name === current });
      })
    );
    var datalist = document.getElementById("campaign-names");
    datalist.replaceChildren(
      ...sorted.map(function (name) {
        return el("option", { value: name });
      })
    );
  }

  function load() {
    stopStreams();
    cards = {};
    polls = [];
    groupsBox.replaceChildren();
    var admin = Tally.role() === "admin";
    filters.hidden = !admin;
    document.getElementById("create").hidden = !admin;
    document.getElementById("campaigns-help").hidden = admin;
    if (Tally.role() === "analyst") {
      document.getElementById("campaigns-help").textContent =
        "An analyst key opens any poll's live page with its segment breakdown; listing polls takes an admin key.";
    }
    if (!admin) return;
    listAll().then(
      function (all) {
        polls = all;
        fillCampaigns();
        render();
      },
      function (error) {
        Tally.say(error.message, "error");
      }
    );
  }

  [campaignFilter, statusFilter].forEach(function (control) {
    control.addEventListener("change", render);
  });
  var typing = null;
  textFilter.addEventListener("input", function () {
    clearTimeout(typing);
    typing = setTimeout(render, 250);
  });
  filters.addEventListener("submit", function (event) {
    event.preventDefault();
  });

  /* --- creating a poll --------------------------------------------------------------- */
  var createForm = document.getElementById("create-form");
  var kind = document.getElementById("new-kind");
  function showKindFields() {
    var value = kind.value;
    createForm.setAttribute("data-kind", value);
    createForm.querySelectorAll(".for-choice").forEach(function (node) {
      node.hidden = value !== "single" && value !== "multi";
    });
    createForm.querySelectorAll(".for-multi").forEach(function (node) {
      node.hidden = value !== "multi";
    });
    createForm.querySelectorAll(".for-rating").forEach(function (node) {
      node.hidden = value !== "rating";
    });
  }
  kind.addEventListener("change", showKindFields);
  showKindFields();

  function slug(text) {
    return text
      .toLowerCase()
      .normalize("NFKD")
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-+|-+$/g, "")
      .slice(0, 64) || "option";
  }

  function lines(text) {
    return text
      .split("\n")
      .map(function (line) {
        return line.trim();
      })
      .filter(Boolean);
  }

  createForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var form = new FormData(createForm);
    var body = {
      title: form.get("title").trim(),
      question: form.get("question").trim(),
      kind: form.get("kind"),
      results_visibility: form.get("results_visibility"),
      dedupe: form.get("dedupe"),
    };
    var id = form.get("id").trim();
    if (id) body.id = id;
    var campaign = form.get("campaign").trim();
    if (campaign) body.campaign = campaign;
    var origins = lines(form.get("allowed_origins"));
    if (origins.length) body.allowed_origins = origins;
    if (body.kind === "single" || body.kind === "multi") {
      body.options = lines(form.get("options")).map(function (line) {
        var split = line.match(/^([A-Za-z0-9_-]{1,64})\s*:\s*(.+)$/);
        return split ? { id: split[1], label: split[2] } : { id: slug(line), label: line };
      });
      if (body.kind === "multi" && form.get("max_choices")) body.max_choices = Number(form.get("max_choices"));
    }
    if (body.kind === "rating") body.scale = { min: Number(form.get("scale_min")), max: Number(form.get("scale_max")) };
    var submit = createForm.querySelector("button[type=submit]");
    submit.disabled = true;
    Tally.api("/v1/polls", { method: "POST", body: body }).then(
      function (created) {
        submit.disabled = false;
        createForm.reset();
        showKindFields();
        polls.push(created);
        polls.sort(function (a, b) {
          return a.id < b.id ? -1 : 1;
        });
        fillCampaigns();
        render();
        Tally.say("Created “" + created.title + "” (" + created.id + ").", "ok");
      },
      function (error) {
        submit.disabled = false;
        Tally.say(error.message + (error.field ? " (" + error.field + ")" : ""), "error");
        var field = error.field && createForm.querySelector('[name="' + error.field.replace(/\[.*$/, "") + '"]');
        if (field) field.focus();
      }
    );
  });

  Tally.keyForm(load);
  load();
})();
