/* tally vote widget.
 *   <script src="{tally}/widget.js" data-poll="POLL" data-ingest="{ingest}" async></script>
 * renders the poll's question where the tag is (or into data-target="#css-selector"), votes,
 * then shows the results as far as the poll shows them, live. Optional attributes:
 * data-ingest (where votes go; default: this script's origin), data-segment
 * ("channel:email,country:DE"), data-voter-id + data-token (require_token polls).
 * The root element carries data-state: loading | ready | voted | already-voted | closed |
 * error, and fires `tally:state` events; each answer is a button with data-option (and,
 * once results show, data-count). One browser votes once per per_voter poll: ingest hands
 * out an anonymous voter token, kept in this site's localStorage and sent back with each
 * vote (works across sites, where tally's cookie is not sent). */
(function () {
  "use strict";
  var CSS = "{{asset:widget.css}}";
  var self = document.currentScript;

  function store(key, value) {
    try {
      if (value === undefined) return localStorage.getItem(key);
      if (value === null) localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch (e) {
      /* storage blocked: this browser is a new voter each visit */
    }
    return null;
  }

  function h(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function randomId() {
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.prototype.map
      .call(bytes, function (b) {
        return (b + 256).toString(16).slice(1);
      })
      .join("");
  }

  function parseSegment(text) {
    var segment = {};
    (text || "").split(",").forEach(function (pair) {
      var at = pair.indexOf(":");
      if (at > 0) segment[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
    });
    return segment;
  }

  function Widget(script) {
    var embed = script.hasAttribute("data-embed");
    var params = new URLSearchParams(location.search);
    this.base = new URL(script.src, location.href).href.replace(/\/widget\.js([?#].*)?$/, "");
    this.poll =
      script.getAttribute("data-poll") ||
      (embed ? decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop()) : "");
    this.ingest = (script.getAttribute("data-ingest") || (embed && params.get("ingest")) || this.base).replace(/\/+$/, "");
    this.segment = parseSegment(script.getAttribute("data-segment"));
    this.voterId = script.getAttribute("data-voter-id");
    this.token = script.getAttribute("data-token");
    this.embed = embed;
    this.voterKey = "tally.voter " + this.ingest;
    this.resultsKey = "tally.results " + this.ingest + " " + this.poll;
    this.chosen = {};
    this.shown = null;

    var root = (this.root = h("div", "tally-widget"));
    root.setAttribute("data-poll", this.poll);
    root.setAttribute("role", "region");
    root.setAttribute("aria-busy", "true");
    this.question = root.appendChild(h("p", "tw-q"));
    this.question.id = "tw-q-" + randomId().slice(0, 8);
    root.setAttribute("aria-labelledby", this.question.id);
    this.list = root.appendChild(h("div", "tw-opts"));
    this.list.setAttribute("role", "group");
    this.list.setAttribute("aria-labelledby", this.question.id);
    this.submit = null;
    this.status = root.appendChild(h("p", "tw-status"));
    this.status.setAttribute("role", "status");
    this.status.setAttribute("aria-live", "polite");

    var target = script.getAttribute("data-target");
    var host = target && document.querySelector(target);
    if (host) host.appendChild(root);
    else script.parentNode.insertBefore(root, script.nextSibling);
    if (!embed && !document.querySelector("link[data-tally-css]")) {
      var link = document.createElement("link");
      link.rel = "stylesheet";
      link.href = this.base + "/" + CSS;
      link.setAttribute("data-tally-css", "");
      document.head.appendChild(link);
    }
    this.state("loading", "Loading the poll…");
    this.load();
  }

  Widget.prototype.state = function (state, message) {
    this.root.setAttribute("data-state", state);
    this.root.setAttribute("aria-busy", state === "loading" ? "true" : "false");
    this.status.textContent = message || "";
    this.root.dispatchEvent(new CustomEvent("tally:state", { bubbles: true, detail: { poll: this.poll, state: state } }));
    this.resize();
  };

  /* In an iframe, the height goes to the embedding page, which may size the frame. */
  Widget.prototype.resize = function () {
    if (this.embed && window.parent !== window) {
      window.parent.postMessage({ tally: "height", poll: this.poll, height: document.documentElement.scrollHeight }, "*");
    }
  };

  Widget.prototype.get = function (path, withResultsToken) {
    var token = withResultsToken && store(this.resultsKey);
    var url = this.base + "/v1/polls/" + encodeURIComponent(this.poll) + path + (token ? "?results_token=" + encodeURIComponent(token) : "");
    return fetch(url, { credentials: "omit" }).then(function (response) {
      return response.json().then(
        function (body) {
          return { status: response.status, body: body };
        },
        function () {
          return { status: response.status, body: {} };
        }
      );
    });
  };

  Widget.prototype.load = function () {
    var w = this;
    this.get("/ballot").then(
      function (answer) {
        if (answer.status !== 200) return w.state("error", answer.body.detail || "This poll is not available.");
        w.ballot = answer.body;
        w.render();
      },
      function () {
        w.state("error", "The poll could not be loaded.");
      }
    );
  };

  Widget.prototype.answers = function () {
    var b = this.ballot;
    if (b.kind === "single" || b.kind === "multi") return b.options;
    var list = [];
    for (var v = b.scale.min; v <= b.scale.max; v++) list.push({ id: String(v), label: String(v) });
    return list;
  };

  Widget.prototype.render = function () {
    var w = this;
    var b = this.ballot;
    this.question.textContent = b.question;
    this.root.classList.add("tw-" + b.kind);
    this.buttons = {};
    this.answers().forEach(function (answer) {
      var button = h("button", "tw-opt");
      button.type = "button";
      button.setAttribute("data-option", answer.id);
      button.appendChild(h("span", "tw-bar"));
      button.appendChild(h("span", "tw-label", answer.label));
      button.appendChild(h("span", "tw-n"));
      if (b.kind === "multi") button.setAttribute("aria-pressed", "false");
      button.addEventListener("click", function () {
        w.pick(answer.id);
      });
      w.buttons[answer.id] = button;
      w.list.appendChild(button);
    });
    if (b.kind === "nps") {
      var ends = this.list.parentNode.insertBefore(h("p", "tw-ends"), this.list.nextSibling);
      ends.appendChild(h("span", "", "Not at all likely"));
      ends.appendChild(h("span", "", "Extremely likely"));
    }
    if (b.kind === "multi") {
      this.submit = this.root.insertBefore(h("button", "tw-submit", "Vote"), this.status);
      this.submit.type = "button";
      this.submit.disabled = true;
      this.submit.addEventListener("click", function () {
        w.vote(Object.keys(w.chosen));
      });
    }
    if (b.status === "open") {
      this.state("ready", b.kind === "multi" ? "Choose up to " + (b.max_choices || b.options.length) + ", then vote." : "");
    } else {
      this.finish("closed", b.status === "scheduled" ? "This poll has not opened yet." : "This poll is closed.");
    }
  };

  Widget.prototype.pick = function (id) {
    var state = this.root.getAttribute("data-state");
    if (state !== "ready" && state !== "error") return;
    if (this.ballot.kind !== "multi") return this.vote(this.ballot.kind === "single" ? id : Number(id));
    var max = this.ballot.max_choices || this.ballot.options.length;
    if (this.chosen[id]) delete this.chosen[id];
    else if (Object.keys(this.chosen).length < max) this.chosen[id] = true;
    for (var key in this.buttons) this.buttons[key].setAttribute("aria-pressed", this.chosen[key] ? "true" : "false");
    this.submit.disabled = !Object.keys(this.chosen).length;
  };

  /* Sends the vote. A retry after an unclear outcome (network, 5xx) reuses the vote id, so
   * the vote counts once however often it is sent. */
  Widget.prototype.vote = function (choice) {
    var w = this;
    var sameBallot = JSON.stringify(choice) === JSON.stringify(this.lastChoice);
    if (!this.voteId || !sameBallot) this.voteId = randomId();
    this.lastChoice = choice;
    var body = { choice: choice, vote_id: this.voteId };
    if (Object.keys(this.segment).length) body.segment = this.segment;
    if (this.voterId) body.voter_id = this.voterId;
    if (this.token) body.token = this.token;
    var headers = { "Content-Type": "application/json" };
    var voter = store(this.voterKey);
    if (voter && !this.voterId) headers["Tally-Voter"] = voter;
    this.root.setAttribute("aria-busy", "true");
    this.status.textContent = "Sending your vote…";
    fetch(this.ingest + "/v1/polls/" + encodeURIComponent(this.poll) + "/votes", {
      method: "POST",
      headers: headers,
      body: JSON.stringify(body),
    }).then(
      function (response) {
        var token = response.headers.get("Tally-Voter");
        if (token) store(w.voterKey, token);
        return response.json().then(
          function (answer) {
            w.answered(response.status, answer, choice);
          },
          function () {
            w.answered(response.status, {}, choice);
          }
        );
      },
      function () {
        w.state("error", "Your vote could not be sent from this page. Try again.");
      }
    );
  };

  Widget.prototype.answered = function (status, answer, choice) {
    var slug = String(answer.type || "").split("/").pop();
    var chosen = [].concat(choice).map(String);
    if (status === 202) {
      if (answer.results_token) store(this.resultsKey, answer.results_token);
      this.mark(chosen);
      return this.finish("voted", "Thank you, your vote counts.");
    }
    if (slug === "already-voted") return this.finish("already-voted", "You have already voted in this poll.");
    if (slug === "poll-closed" || slug === "poll-not-open" || slug === "poll-archived") {
      return this.finish("closed", "This poll is closed.");
    }
    var retry = status === 0 || status === 408 || status === 429 || status >= 500;
    this.state("error", (answer.detail || "Your vote was not taken.") + (retry ? " Try again." : ""));
  };

  Widget.prototype.mark = function (chosen) {
    for (var key in this.buttons) {
      if (chosen.indexOf(key) >= 0) this.buttons[key].classList.add("tw-mine");
    }
  };

  /* Voting is over for this browser: show the results if the poll shows them, and follow
   * them live. */
  Widget.prototype.finish = function (state, message) {
    var w = this;
    for (var key in this.buttons) this.buttons[key].setAttribute("aria-disabled", "true");
    if (this.submit) this.submit.hidden = true;
    this.state(state, message);
    var visibility = this.ballot.results_visibility;
    var closed = state === "closed";
    if (visibility === "private" || (visibility === "after_close" && !closed)) {
      if (visibility === "after_close") this.status.textContent = message + " Results are shown when the poll closes.";
      return;
    }
    this.get("/results", visibility === "after_vote").then(function (answer) {
      if (answer.status !== 200) return;
      w.show(answer.body);
      w.follow(visibility === "after_vote");
    });
  };

  Widget.prototype.follow = function (withToken) {
    var w = this;
    if (this.source || typeof EventSource === "undefined") return;
    var token = withToken && store(this.resultsKey);
    this.source = new EventSource(
      this.base + "/v1/polls/" + encodeURIComponent(this.poll) + "/live" + (token ? "?results_token=" + encodeURIComponent(token) : "")
    );
    var update = function (event) {
      try {
        w.show(JSON.parse(event.data));
      } catch (e) {
        /* not results */
      }
    };
    this.source.addEventListener("snapshot", update);
    this.source.addEventListener("totals", update);
    this.source.addEventListener("hidden", function () {
      w.source.close();
    });
  };

  /* Shows results unless newer ones are shown: totals never go back. */
  Widget.prototype.show = function (results) {
    if (this.shown && results.as_of <= this.shown.as_of) return;
    this.shown = results;
    var most = 0;
    results.options.forEach(function (o) {
      most = Math.max(most, o.share);
    });
    var w = this;
    this.root.classList.add("tw-results");
    results.options.forEach(function (o) {
      var button = w.buttons[o.id];
      if (!button) return;
      button.setAttribute("data-count", String(o.count));
      button.querySelector(".tw-n").textContent = w.ballot.kind === "single" || w.ballot.kind === "multi" ? Math.round(o.share * 100) + "%" : String(o.count);
      button.querySelector(".tw-bar").style.setProperty("--tw-share", (most ? (o.share / most) * 100 : 0).toFixed(1));
      button.setAttribute("aria-label", (w.ballot.kind === "single" || w.ballot.kind === "multi" ? "" : "Score ") + button.querySelector(".tw-label").textContent + ": " + o.count + " votes");
    });
    var line = results.total_votes + (results.total_votes === 1 ? " vote" : " votes");
    if (results.nps && results.nps.score !== null) line = "NPS " + Math.round(results.nps.score) + " · " + line;
    if (results.rating && results.rating.mean !== null) line = "Average " + results.rating.mean.toFixed(1) + " · " + line;
    var total = this.total || (this.total = this.root.insertBefore(h("p", "tw-total"), this.status.nextSibling));
    total.textContent = line;
    this.resize();
  };

  function boot(script) {
    if (!script || script.hasAttribute("data-tally-ready")) return;
    script.setAttribute("data-tally-ready", "");
    new Widget(script);
  }

  if (self) boot(self);
  /* Scripts run out of order (async, or added by a tag manager) may have no currentScript:
   * every widget tag not yet started is started. */
  var tags = document.querySelectorAll("script[data-poll], script[data-embed]");
  for (var i = 0; i < tags.length; i++) {
    if (/\/widget\.js([?#]|$)/.test(tags[i].src)) boot(tags[i]);
  }
})();
