/* tally dashboard: what every page shares — the API key of this browser session, calls to
 * the API, the live stream client and formatting. No framework and no build step: the
 * files are served as written, compiled into the tally binary. */
"use strict";

var Tally = (function () {
  var KEY = "tally.key";
  var ROLE = "tally.role";
  var rootMeta = document.querySelector('meta[name="tally-root"]');
  /* The site root, from this page's address: pages are served under /dashboard/…, and the
   * API beside them, so a path prefix added by a proxy is kept. */
  var root = new URL(rootMeta ? rootMeta.content : "/", location.href).href.replace(/\/$/, "");

  function url(path) {
    return root + path;
  }

  /* The key is kept for this browser session only (sessionStorage): it is asked once and
   * forgotten when the session ends. */
  function key() {
    try {
      return sessionStorage.getItem(KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function role() {
    try {
      return (key() && sessionStorage.getItem(ROLE)) || "";
    } catch (e) {
      return "";
    }
  }

  function setKey(value, keyRole) {
    try {
      if (value) {
        sessionStorage.setItem(KEY, value);
        sessionStorage.setItem(ROLE, keyRole);
      } else {
        sessionStorage.removeItem(KEY);
        sessionStorage.removeItem(ROLE);
      }
    } catch (e) {
      /* storage disabled: the key lasts as long as the page */
    }
  }

  /* An error the API answered: problem+json's title and detail. */
  function ApiProblem(status, problem) {
    this.status = status;
    this.slug = String(problem.type || "").split("/").pop();
    this.title = problem.title || "Request failed";
    this.detail = problem.detail || "";
    this.field = problem.field;
    this.message = this.detail || this.title;
  }

  /* Calls the API; resolves with the JSON answer, rejects with an ApiProblem.
   * options: method, body (JSON), auth (send the key; default true when there is one). */
  function api(path, options) {
    options = options || {};
    var headers = { Accept: "application/json" };
    if (options.auth !== false && key()) headers.Authorization = "Bearer " + key();
    var init = { method: options.method || "GET", headers: headers, cache: "no-store" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    return fetch(url(path), init).then(
      function (response) {
        return response.text().then(function (text) {
          var data = null;
          try {
            data = text ? JSON.parse(text) : null;
          } catch (e) {
            data = null;
          }
          if (!response.ok) throw new ApiProblem(response.status, data || {});
          return data;
        });
      },
      function () {
        throw new ApiProblem(0, { title: "Network error", detail: "tally could not be reached" });
      }
    );
  }

  /* What a key may do: "admin" lists polls, "analyst" is refused that (403) but is a key
   * the service knows; an unknown key is 401. */
  function checkKey(candidate) {
    return fetch(url("/v1/polls?limit=1"), {
      headers: { Authorization: "Bearer " + candidate },
      cache: "no-store",
    }).then(function (response) {
      if (response.status === 200) return "admin";
      if (response.status === 403) return "analyst";
      if (response.status === 401) throw new ApiProblem(401, { title: "Unknown key", detail: "tally does not know this key" });
      throw new ApiProblem(response.status, { title: "Cannot check the key", detail: "the service answered " + response.status });
    });
  }

  /* A Server-Sent Events client over fetch, so it can send the key (EventSource cannot).
   * Reconnects after a drop with Last-Event-ID, backing off; a `reconnect` event from a
   * draining server reconnects at once. onStatus gets "connecting", "live", "reconnecting"
   * or "stopped" (with a reason); onEvent gets (type, data, id). A stream quiet for longer
   * than three heartbeats is presumed dead and reopened. */
  function stream(path, handlers) {
    var stopped = false;
    var lastId = null;
    var controller = null;
    var delay = 1000;
    var quietTimer = null;
    var QUIET_MS = 45000;

    function status(state, reason) {
      if (handlers.onStatus) handlers.onStatus(state, reason);
    }

    function armWatchdog() {
      clearTimeout(quietTimer);
      quietTimer = setTimeout(function () {
        if (controller) controller.abort();
      }, QUIET_MS);
    }

    function dispatch(block) {
      var type = "message";
      var data = [];
      var id = null;
      var lines = block.split("\n");
      for (var i = 0; i < lines.length; i++) {
        var line = lines[i];
        if (!line || line.charAt(0) === ":") continue;
        var colon = line.indexOf(":");
        var field = colon < 0 ? line : line.slice(0, colon);
        var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = value;
        else if (field === "data") data.push(value);
        else if (field === "id") id = value;
        else if (field === "retry" && /^\d+$/.test(value)) delay = Math.max(500, Number(value));
      }
      if (id !== null) lastId = id;
      if (!data.length) return;
      var parsed;
      try {
        parsed = JSON.parse(data.join("\n"));
      } catch (e) {
        parsed = data.join("\n");
      }
      if (type === "reconnect") {
        delay = 0;
        if (controller) controller.abort();
        return;
      }
      handlers.onEvent(type, parsed, id);
    }

    function connect() {
      if (stopped) return;
      controller = new AbortController();
      var headers = { Accept: "text/event-stream" };
      if (key()) headers.Authorization = "Bearer " + key();
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      status(lastId === null ? "connecting" : "reconnecting");
      armWatchdog();
      fetch(url(path), { headers: headers, signal: controller.signal, cache: "no-store" })
        .then(function (response) {
          if (!response.ok) {
            return response.text().then(function (text) {
              var problem = {};
              try {
                problem = JSON.parse(text);
              } catch (e) {
                /* not problem+json */
              }
              var error = new ApiProblem(response.status, problem);
              /* A refusal (hidden, unknown poll, bad key) will not heal by retrying. */
              if (response.status >= 400 && response.status < 500 && response.status !== 408 && response.status !== 429) {
                error.final = true;
              }
              throw error;
            });
          }
          status("live");
          delay = 1000;
          var reader = response.body.getReader();
          var decoder = new TextDecoder();
          var buffer = "";
          /* Reads chunk after chunk without chaining one promise to the next: a read loop
           * written as `return read().then(… return pump())` keeps every promise of the
           * stream's life alive until it ends, and a live stream may not end for days. */
          return new Promise(function (resolve, reject) {
            function pump() {
              reader.read().then(function (chunk) {
                if (chunk.done) return resolve();
                armWatchdog();
                buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
                var end;
                while ((end = buffer.indexOf("\n\n")) >= 0) {
                  var block = buffer.slice(0, end);
                  buffer = buffer.slice(end + 2);
                  try {
                    dispatch(block);
                  } catch (error) {
                    return reject(error);
                  }
                  if (stopped) return resolve();
                }
                pump();
              }, reject);
            }
            pump();
          });
        })
        .catch(function (error) {
          if (error && error.final) {
            stopped = true;
            clearTimeout(quietTimer);
            status("stopped", error);
            return;
          }
        })
        .then(function () {
          if (stopped) return;
          status("reconnecting");
          var wait = delay + Math.random() * 250;
          delay = Math.min(Math.max(delay * 2, 1000), 15000);
          setTimeout(connect, wait);
        });
    }

    connect();
    return {
      close: function () {
        stopped = true;
        clearTimeout(quietTimer);
        if (controller) controller.abort();
      },
    };
  }

  var numbers = new Intl.NumberFormat(undefined);
  function count(n) {
    return numbers.format(n || 0);
  }
  function percent(share, digits) {
    if (share === null || share === undefined || isNaN(share)) return "–";
    return (share * 100).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  /* Builds an element: el("p", {class: "x", text: "…"}, [children]). Text is always set as
   * text, never parsed as HTML. */
  function el(tag, attributes, children) {
    var node = document.createElement(tag);
    var attrs = attributes || {};
    Object.keys(attrs).forEach(function (name) {
      var value = attrs[name];
      if (value === null || value === undefined || value === false) return;
      if (name === "text") node.textContent = value;
      else if (name === "on") {
        Object.keys(value).forEach(function (event) {
          node.addEventListener(event, value[event]);
        });
      } else node.setAttribute(name, value === true ? "" : String(value));
    });
    (children || []).forEach(function (child) {
      if (child) node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  /* Announces `text` in the page's polite live region (for screen readers) and shows it. */
  function say(text, kind) {
    var region = document.getElementById("notice");
    if (!region) return;
    region.textContent = text;
    region.className = "notice" + (kind ? " " + kind : "");
    region.hidden = !text;
  }

  /* The key form in the page header: one key per browser session. `changed` runs after a
   * key is saved or forgotten. */
  function keyForm(changed) {
    var form = document.getElementById("key-form");
    var input = document.getElementById("key-input");
    var state = document.getElementById("key-state");
    var forget = document.getElementById("key-forget");
    if (!form) return;
    function show() {
      var current = role();
      state.textContent = current ? "Signed in with an " + current + " key" : "Public view";
      forget.hidden = !current;
      form.querySelector(".key-entry").hidden = !!current;
    }
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var candidate = input.value.trim();
      if (!candidate) return;
      state.textContent = "Checking…";
      checkKey(candidate).then(
        function (keyRole) {
          setKey(candidate, keyRole);
          input.value = "";
          show();
          say("Key accepted: " + keyRole + " views are on for this browser session.", "ok");
          changed();
        },
        function (error) {
          show();
          say(error.message, "error");
          input.focus();
        }
      );
    });
    forget.addEventListener("click", function () {
      setKey("", "");
      show();
      say("Key forgotten.", "ok");
      changed();
    });
    show();
  }

  /* When the live numbers were last repainted (performance.now(), the last 64): how tests
   * and curious people check that a busy poll repaints at most ten times a second. */
  var renders = [];
  function noteRender() {
    renders.push(performance.now());
    if (renders.length > 64) renders.shift();
  }
  function renderLog() {
    return renders.slice();
  }

  return {
    noteRender: noteRender,
    renderLog: renderLog,
    url: url,
    api: api,
    key: key,
    role: role,
    stream: stream,
    count: count,
    percent: percent,
    el: el,
    say: say,
    keyForm: keyForm,
    ApiProblem: ApiProblem,
  };
})();
