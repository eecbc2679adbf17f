/*
 * Redis Streams: many onceq processes, on many machines, as competing
 * consumers of one stream, with the effect of every event applied exactly
 * once. Commands: `onceq send --redis`, `onceq request`, `onceq run
 * --redis`, `onceq dlq --redis`, `onceq export --redis` (their command
 * lines are parsed in stream_cli.c and run.c; this file does the work).
 *
 * DESIGN
 * ------
 * Keys (S is --stream; every key starts with S, so one Redis holds many
 * queues; with --partitions P, each of the P partitions is a stream named
 * {S:k} with all these keys under that name, one hash tag: see
 * "partitions" below):
 *   S               the stream; entry fields: e (the event line), s (source,
 *                   file:line), and on a re-added retry a (attempts before
 *                   this entry) and f (first seen, unix ms); big (the full
 *                   length) marks a line cut at 4 KiB for being too large
 *   S:id:<id>       the claims, one string per event id: a claim token
 *                   (SET PX = the delivery's rest), deleted when the id is
 *                   settled; "D" in a stream written before the buckets (an
 *                   old done-mark: still honoured, never written now)
 *   S:d:<g>         done-mark generation g's table (L, nx, n; DM_LUA)
 *   S:d:<g>:<b>     the processed set: done-marks as fields of small
 *                   hashes (12 digest bytes -> 1), about 20 bytes an id;
 *                   with --retention a generation expires after 2 of them
 *   S:dd:<g>, S:dd:<g>:<b>  producer dedup (send, --dedup-window W):
 *                   marks as the done-marks' (DM_LUA), generations of W
 *                   (streams written before kept S:dedup:<id> strings)
 *   S:rp:<id>       a settled request's reply body (request-reply), for
 *                   its duplicates: SET PX --reply-ttl
 *   R:rq:<corr>     a request's context (send --reply-to R), read by
 *                   run --join-requests on the reply stream R
 *   S:counts        hash: aggregates (HINCRBY), e.g. word -> count
 *   S:results       stream: records (field id, field r)
 *   S:dlq           stream: dead letters (id, reason, error, attempts,
 *                   event, source, first_seen, last_seen)
 *   S:delayed       zset: retries waiting for their backoff, scored by due
 *                   time (Redis TIME, ms); member "entry\nattempts\nfirst\n
 *                   source\nevent"
 *   S:stats         hash: sent, rejected, processed, duplicates, dead,
 *                   dead:<reason>, retried, fenced, redriven; written only
 *                   inside the scripts, so it is exact whatever fails
 *   S:meta          hash: output (counts|records), count_key, handler,
 *                   epoch (random, written once at the stream's first
 *                   use: its absence means the data was lost), retention
 *                   (ms, 0: forever; fixed at the first run)
 *
 * Threads of `onceq run --redis` (each with its own hiredis context: a
 * context is not thread-safe, and a worker blocked in XREADGROUP must not
 * hold up another's commit):
 *   - N workers. Each loops: take entries (its held BUSY entries when due,
 *     then the process's reclaimed list, then XREADGROUP ... COUNT n BLOCK
 *     100 STREAMS S >), decode each line (oq__json_decode), keep one claim
 *     per id (a second copy of an entry is dropped, another entry of the
 *     id is redone after the batch), claim the ids with one CLAIM script,
 *     run the handler on the claimed ones, and settle the batch with one
 *     COMMIT script; when the handler may block (not never_blocks), what
 *     is decided is committed before each next handler call, so a
 *     finished event never waits behind a hanging batch-mate. The brief suggested
 *     one fetcher thread feeding the workers; reading in each worker needs
 *     no local queue (a message never waits in our memory while its
 *     visibility clock runs), no hand-off, and gives backpressure for free.
 *     The read size adapts: at most what the handler can finish in a
 *     quarter of the visibility timeout; one for slow handlers that may
 *     block. Every entry carries its delivery deadline (the delivering
 *     call's start + vt): the claim's lease is what is left of it, so the
 *     lease ends when XAUTOCLAIM may hand the entry over; a copy past it
 *     is dropped, never claimed.
 *   - one housekeeper: every 20 ms moves due retries from S:delayed back
 *     into the stream (PROMOTE script); every min(vt/4, 1 s) takes over
 *     messages idle longer than the visibility timeout with XAUTOCLAIM (a
 *     dead or hung consumer's; no more than the workers finish in vt/4, and
 *     again at the next tick while there is more), reads their delivery
 *     counts with XPENDING (pipelined) and puts them on the reclaimed list
 *     (r->mu, a leaf lock); every 2 s trims the entries every group has
 *     settled (TRIM script: XTRIM MINID); with --drain, runs the DRAIN script, which says atomically
 *     whether anything is pending with any consumer, delayed, or not yet
 *     delivered to the group; when nothing is, the run stops.
 *   - one heartbeat thread (only for handlers that may block): every
 *     min(vt/12, 100 ms) looks at each worker's rbeat (its running
 *     handler's claim key, token and entry, under the worker's hb.mu, a
 *     leaf lock: copied, unlocked, then sent) and, once a third of the
 *     lease has passed since the delivery or the last renewal and until
 *     the attempt's end (--timeout), runs the BEAT script. A dead or
 *     stopped process stops heartbeating: its entries are taken over one
 *     lease later.
 *   - the metrics threads (metrics.c, with --metrics/--metrics-listen)
 *     read only atomics: the counters, each worker's in-flight count and
 *     histogram, and the group's backlog the housekeeper reads about once
 *     a second (XINFO GROUPS lag, the first undelivered entry's time).
 *   - the main thread waits for SIGINT/SIGTERM (blocked in every other
 *     thread) and for the end.
 *
 * Redis Cluster: the servers given are seeds. A connection follows MOVED
 * (it moves to the node named, for good) and ASK (ASKING, that call
 * there), and goes back to the seeds when its node is gone; the epoch
 * check at (re)connect is done on the node that holds the partition's
 * meta. A map of each partition's primary (CLUSTER SLOTS; read again
 * after a MOVED: rurl.remap) lets each thread keep one connection per
 * primary (rconns, pconn); on a single Redis, one. A
 * batch is read from one partition and claimed and committed there: each
 * script touches one slot. Request-reply is refused on a cluster (a reply
 * is written with its request's commit, into another slot).
 *
 * Safety checks at start (run and send; exit 2): the server's
 * maxmemory-policy must be noeviction, on every primary of a cluster (an
 * evicted claim or done-mark runs an event twice), and the stream's keys,
 * where they exist, must have their types (a stream named S:counts is S's
 * counts hash). Every connection
 * checks S:meta's epoch when it (re)connects; the DRAIN and SEND scripts
 * and ensure_group (a missing group) check it too: data lost under a
 * running consumer stops it with exit 3, never starts the stream over.
 * Transient error replies (LOADING, BUSY, TRYAGAIN, READONLY: the command
 * was refused before it ran) are retried like a lost connection, with the
 * same backoff and limit, in rc_cmd/rc_script/rc_open.
 *
 * Scripts (Lua, below as C strings; SCRIPT LOAD at connect, EVALSHA, and
 * EVAL when the server answers NOSCRIPT, e.g. after a SCRIPT FLUSH). The
 * ones that write outputs (COMMIT, SEND) check the types of the keys they
 * write before their first write: Redis does not roll back a script that
 * fails halfway.
 *   CLAIM    per id: its done-mark (DM_LUA) -> DONE; else SET key token
 *            NX PX (the delivery's rest); else GET: "D" (an old mark) ->
 *            DONE, our own token -> CLAIMED (a retried call is
 *            idempotent), another token -> BUSY with its PTTL (and the
 *            entry's delivery renewed, XCLAIM JUSTID); a key seen earlier
 *            in the call -> a same-batch duplicate.
 *   COMMIT   per message, one op: C (commit: token still current -> its
 *            done-mark, claim deleted, outputs, ack), F (handler FAIL, max
 *            attempts: token current -> done-mark, dead letter, ack), X (dead letter
 *            without an id to settle: bad input), R (retry: token current ->
 *            release, ZADD S:delayed, ack), D (duplicate: ack). Counters
 *            are summed per batch and applied with one HINCRBY per key,
 *            commits acked with one XACK. All of it is one script, so it
 *            happens entirely or not at all.
 *   BEAT     a heartbeat: if the claim key holds our token, PEXPIRE it to
 *            vt and XCLAIM the entry JUSTID (idle 0, count unchanged).
 *   PROMOTE, DRAIN, SEND (producer dedup), REDRIVE, TRIM.
 *
 * Fencing: a claim is the key S:id:<id> holding a token unique to this
 * process (a random 64-bit nonce, the worker, a counter), with PX = what
 * is left of the entry's delivery (so on Redis's clock it ends no later
 * than XAUTOCLAIM may hand the entry over). The COMMIT script applies outputs
 * only if the key still holds the token. A consumer that overran its lease
 * (hung, stopped, slow) finds the key expired, taken by another token, or
 * deleted (settled by another): its late commit changes nothing and its message is not acked by it
 * (the consumer that took it over acks it). Because the COMMIT script is
 * the only write of effects, a call retried after a reconnect (whose first
 * run may have happened) is fenced the second time: never applied twice.
 *
 * Attempts: attempts = a (carried across retries) + the delivery count
 * (1 for a new read, XPENDING's count for a taken-over message). Above
 * --max-attempts at delivery, or on a RETRY at --max-attempts, the message
 * is dead-lettered with reason max_attempts, after its id is claimed (a
 * processed id is a duplicate, a BUSY one is kept), and the id is settled:
 * one outcome per id. A BUSY id is not an attempt: the CLAIM script
 * renews the entry's delivery without counting it, and the worker keeps
 * the message and claims it again after min(5 ms, the holder's lease
 * left).
 *
 * Accounting: every entry is acked exactly once, by the script that
 * settles it, and S:stats counts an outcome only when its XACK removed the
 * entry (or, for a commit, when the fenced effect was applied). So once
 * drained: sent = processed + duplicates + dead.
 */
#include "oq_cli.h"

#include <hiredis/hiredis.h>
#include <xxhash.h>

#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "oq_uthash.h"

#define SEND_WINDOW 8          /* send batches in flight */
#define BLOCK_MS 100           /* XREADGROUP BLOCK: how soon a stop is seen */
#define BUSY_RETRY_MS 5
#define HOUSE_TICK_MS 20
#define RECONNECT_GIVE_UP_MS 60000
#define KEEP_LARGE 4096
#define TRIM_EVERY_MS 2000     /* XTRIM the settled entries this often */
#define IDLE_SWEEP 4           /* partitions an idle worker reads a time */

/* ============================================================= scripts */

enum { SC_CLAIM, SC_COMMIT, SC_PROMOTE, SC_DRAIN, SC_SEND, SC_REDRIVE,
       SC_BEAT, SC_TRIM, SC__COUNT };

/*
 * Done-marks, the Lua shared by CLAIM, COMMIT and REDRIVE (prepended to
 * each). An id's mark is a field of a hash bucket: the field is the first
 * 12 bytes of the id's XXH3-128 digest (computed by the client: Lua has no
 * XXH3), the bucket is chosen by the digest's first 4 bytes h. One string
 * key per id cost 90 to 126 bytes; a field of a small hash, which Redis
 * keeps in its listpack encoding (hash-max-listpack-entries, 128 by
 * default), costs about 16. So that buckets stay small however many ids
 * come, they are a linear hash table: generation G's state is the hash
 * DP..G (L, nx: the table has 2^L + nx buckets; n: its marks), bucket a is
 * DP..G..':'..a, h's bucket is h mod 2^L, or h mod 2^(L+1) when that is
 * below nx (already split); once n passes LOAD marks per bucket, bucket nx
 * is split (its fields whose h mod 2^(L+1) is nx + 2^L move). A bucket
 * keeps a sentinel field '' so that it never becomes empty: an empty hash
 * is deleted, and one created again would lose its expiry.
 * Retention (RET ms, 0: forever): generation G holds the marks written
 * between G*RET and (G+1)*RET on Redis's clock and expires, state and
 * buckets, at (G+2)*RET; a lookup reads the current generation and the
 * previous one. So a mark lives at least RET and at most 2*RET, and memory
 * holds at most two generations. Without retention there is one
 * generation, 0, forever.
 */
#define DM_LUA \
"local function dm_now()\n" \
"  local t = redis.call('TIME')\n" \
"  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n" \
"end\n" \
"local function dm_h(f)\n" \
"  local a, b, c, d = string.byte(f, 1, 4)\n" \
"  return ((a * 256 + b) * 256 + c) * 256 + d\n" \
"end\n" \
"local function dm_gen(RET, now)\n" \
"  if RET > 0 then return math.floor(now / RET) end\n" \
"  return 0\n" \
"end\n" \
"local function dm_gens(DP, RET, now)\n" \
"  local g, out = dm_gen(RET, now), {}\n" \
"  for i = 0, (RET > 0 and 1 or 0) do\n" \
"    local s = redis.call('HMGET', DP .. (g - i), 'L', 'nx')\n" \
"    if s[1] then\n" \
"      out[#out + 1] = {DP .. (g - i) .. ':', tonumber(s[1]), tonumber(s[2])}\n" \
"    end\n" \
"  end\n" \
"  return out\n" \
"end\n" \
"local function dm_addr(s, f)\n" \
"  local h = dm_h(f)\n" \
"  local a = h % 2 ^ s[2]\n" \
"  if a < s[3] then a = h % 2 ^ (s[2] + 1) end\n" \
"  return s[1] .. a\n" \
"end\n" \
"local function dm_done(gens, f)\n" \
"  for _, s in ipairs(gens) do\n" \
"    if redis.call('HEXISTS', dm_addr(s, f), f) == 1 then return true end\n" \
"  end\n" \
"  return false\n" \
"end\n" \
"local function dm_cur(DP, RET, now)\n" \
"  local g = dm_gen(RET, now)\n" \
"  local gk = DP .. g\n" \
"  local s = redis.call('HMGET', gk, 'L', 'nx', 'n')\n" \
"  local st = {gk .. ':', tonumber(s[1] or 0), tonumber(s[2] or 0),\n" \
"              tonumber(s[3] or 0), gk, (g + 2) * RET}\n" \
"  if not s[1] then\n" \
"    redis.call('HSET', gk, 'L', 0, 'nx', 0, 'n', 0)\n" \
"    redis.call('HSET', st[1] .. 0, '', 0)\n" \
"    if RET > 0 then\n" \
"      redis.call('PEXPIREAT', gk, st[6])\n" \
"      redis.call('PEXPIREAT', st[1] .. 0, st[6])\n" \
"    end\n" \
"  end\n" \
"  return st\n" \
"end\n" \
"local function dm_mark(st, f)\n" \
"  st[4] = st[4] + redis.call('HSET', dm_addr(st, f), f, 1)\n" \
"end\n" \
"local function dm_split(st, RET)\n" \
"  local L, nx = st[2], st[3]\n" \
"  local src, dst = st[1] .. nx, st[1] .. (nx + 2 ^ L)\n" \
"  local m = 2 ^ (L + 1)\n" \
"  local mv, kv = {}, {'', 0}\n" \
"  for _, f in ipairs(redis.call('HKEYS', src)) do\n" \
"    if f ~= '' and dm_h(f) % m ~= nx then\n" \
"      mv[#mv + 1] = f; kv[#kv + 1] = f; kv[#kv + 1] = 1\n" \
"    end\n" \
"  end\n" \
"  redis.call('HSET', dst, unpack(kv))\n" \
"  if #mv > 0 then redis.call('HDEL', src, unpack(mv)) end\n" \
"  if RET > 0 then redis.call('PEXPIREAT', dst, st[6]) end\n" \
"  nx = nx + 1\n" \
"  if nx == 2 ^ L then L = L + 1; nx = 0 end\n" \
"  st[2], st[3] = L, nx\n" \
"end\n" \
"local function dm_finish(st, RET, LOAD)\n" \
"  while st[4] > LOAD * (2 ^ st[2] + st[3]) do dm_split(st, RET) end\n" \
"  redis.call('HSET', st[5], 'L', st[2], 'nx', st[3], 'n', st[4])\n" \
"end\n" \
"local function dm_touch(DP, RET, now, fields, LOAD, gens)\n" \
"  local gk = DP .. dm_gen(RET, now)\n" \
"  local s = redis.call('HMGET', gk, 'L', 'nx', 'n')\n" \
"  local st = {gk .. ':', tonumber(s[1] or 0), tonumber(s[2] or 0)}\n" \
"  local seen, list = {}, {}\n" \
"  local function add(a)\n" \
"    if not seen[a] then seen[a] = true; list[#list + 1] = a end\n" \
"  end\n" \
"  for _, f in ipairs(fields) do\n" \
"    add(dm_addr(st, f))\n" \
"    for _, g in ipairs(gens) do add(dm_addr(g, f)) end\n" \
"  end\n" \
"  local L, nx, n = st[2], st[3], tonumber(s[3] or 0) + #fields\n" \
"  while n > LOAD * (2 ^ L + nx) do\n" \
"    add(st[1] .. nx); add(st[1] .. (nx + 2 ^ L))\n" \
"    nx = nx + 1\n" \
"    if nx == 2 ^ L then L = L + 1; nx = 0 end\n" \
"  end\n" \
"  for i = 1, #list, 1000 do\n" \
"    redis.call('EXISTS', unpack(list, i, math.min(i + 999, #list)))\n" \
"  end\n" \
"end\n"

static const char *const script_text[SC__COUNT] = {
/* CLAIM. KEYS: [1] stream, then the id keys (the claims). ARGV: [1] the
 * batch's token prefix [2] group [3] consumer [4] the done-marks' prefix
 * DP [5] retention (ms, 0: forever), then per id key KEYS[i] (i >= 2): its
 * stream entry ARGV[3i] (its token is prefix .. entry), its lease
 * ARGV[3i+1] (ms: what is left of the entry's delivery, so that the lease
 * ends when XAUTOCLAIM may hand the entry to another consumer) and its
 * mark's field ARGV[3i+2] (see DM_LUA). Per key: 0 claimed, -1 done (a
 * mark in the current or the previous generation, or "D" in the claim
 * key: the done-mark of the layout before the buckets, still honoured),
 * -2 a key already claimed earlier in this call (a same-batch duplicate:
 * redone after the batch), or the holder's lease left (ms, BUSY). Our own
 * token answers 0 only when the whole call is run again (a reconnect):
 * tokens are unique per batch and entry, and a key is claimed once per
 * call. A BUSY entry's delivery is renewed (XCLAIM JUSTID: idle time 0,
 * delivery count unchanged): BUSY is not an attempt, and the entry must
 * not be handed over again while we keep it. */
DM_LUA
"local S, pre, G, C = KEYS[1], ARGV[1], ARGV[2], ARGV[3]\n"
"local gens = dm_gens(ARGV[4], tonumber(ARGV[5]), dm_now())\n"
"local out, seen = {}, {}\n"
"for i = 2, #KEYS do\n"
"  local k, e, px, f = KEYS[i], ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]\n"
"  local tok = pre .. e\n"
"  if seen[k] then out[i - 1] = -2\n"
"  elseif dm_done(gens, f) then out[i - 1] = -1\n"
"  elseif redis.call('SET', k, tok, 'NX', 'PX', px) then\n"
"    out[i - 1] = 0\n"
"  else\n"
"    local v = redis.call('GET', k)\n"
"    if v == 'D' then out[i - 1] = -1\n"
"    elseif v == tok then out[i - 1] = 0\n"
"    else\n"
"      local t = redis.call('PTTL', k)\n"
"      if t < 1 then t = 1 end\n"
"      redis.call('XCLAIM', S, G, C, 0, e, 'JUSTID')\n"
"      out[i - 1] = t\n"
"    end\n"
"  end\n"
"  seen[k] = true\n"
"end\n"
"return out\n",

/* COMMIT. KEYS: [1] stream [2] counts [3] results [4] dlq [5] delayed
 * [6] stats, then the id keys (claims) of the nc commits, then those of
 * the other ops that hold a claim. ARGV: [1] group [2] token prefix [3] nc
 * [4] ncounts [5] nrecs [6] the done-marks' prefix DP [7] retention (ms)
 * [8] marks per bucket before a split (LOAD) [9] nreplies [10] the
 * replies' cache TTL (ms) [11] the replies' source field, then the nc
 * commits' entries, their nc mark fields, the batch's counts summed per
 * key (key delta)*ncounts, the records (id rec)*nrecs, the replies
 * (which to cache head body)*nreplies, then the other ops, each:
 * op entry k id field + tail:
 *   D (duplicate), E (a duplicate reply, also counted duplicate_replies):
 *                   -           R (retry): delay_ms member
 *   F (handler FAIL: settle the id), L (a late reply: F, also counted
 *   late_replies), T (a reply after its request's deadline: L, also
 *   counted timeouts), X (no settling): reason error attempts event
 *                                   source first
 * (k: index of the op's id key in KEYS, 0 = none; field: its mark's, for
 * F). If any commit's claim is no longer ours, nothing is written and
 * {-1, {its indexes}} comes back (the client drops them and calls again);
 * otherwise {1, {per other op: 1 done, 0 settled by another consumer, -1
 * fenced}}. A settled id gets its done-mark (DM_LUA) and its claim key is
 * deleted. A reply (request-reply: docs/REQUEST-REPLY.md) belongs to one
 * op, which: j > 0 the j-th commit, j < 0 the -j-th other op; it is
 * written only if that op was done: XADD to (field e head..body, s) and
 * the body cached (SET cache body PX ttl); for a duplicate (body empty)
 * the cached body, if any, goes out under the duplicate's own head. A
 * reply to a stream marked gone (R:gone, left by an `onceq request` that
 * gave up and deleted its reply stream) has no reader: it is not written,
 * only counted (replies_dropped); nor is one to a key that is not a
 * stream (the requester named a key of another kind:
 * replies_undeliverable; the request itself commits). A reply stream's
 * two keys' types (and its gone mark) are checked once a call, just
 * before its first reply, after everything else the script wrote, so no
 * write fails halfway; rdecode refuses a reply_to that names an onceq key
 * (reply_to_reserved), so no later write of the script creates one of
 * them. Its stats are counted once a call.
 * The reply streams' stats count the replies as sent. The answer's [3],
 * [4] and [5]: requests answered, duplicates answered again, replies
 * written.
 * Before the first write, the keys it will write must be of their
 * types (or absent), else a WRONGTYPE error comes back and nothing is
 * written: Redis does not roll a script back, so a WRONGTYPE halfway
 * (another stream named S:counts) would leave the ids marked and acked
 * without their counts. Claims are read with one MGET and deleted with one
 * DEL: a redis.call costs about a microsecond and each argument a fifth of
 * one, so a commit with counts costs its entry, its field and its mark. */
DM_LUA
"local S, G, pre = KEYS[1], ARGV[1], ARGV[2]\n"
"local nc, ncnt, nrec = tonumber(ARGV[3]), tonumber(ARGV[4]),\n"
"                       tonumber(ARGV[5])\n"
"local DP, RET, LOAD = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])\n"
"local nrp, RTTL, RSRC = tonumber(ARGV[9]), ARGV[10], ARGV[11]\n"
"local H = 11\n"
"local cur = {}\n"
"if #KEYS > 6 then cur = redis.call('MGET', unpack(KEYS, 7, #KEYS)) end\n"
"local fenced = {}\n"
"for j = 1, nc do\n"
"  if cur[j] ~= pre .. ARGV[H + j] then fenced[#fenced + 1] = j end\n"
"end\n"
"if #fenced > 0 then return {-1, fenced} end\n"
"local now = dm_now()\n"
"local function clash(k, t)\n"
"  local h = redis.call('TYPE', k)['ok']\n"
"  if h == 'none' or h == t then return nil end\n"
"  return redis.error_reply('WRONGTYPE ' .. k .. ' is a ' .. h ..\n"
"    ', not the ' .. t .. ' of stream ' .. S .. ' (another stream\\'s ' ..\n"
"    'name clashes with it); nothing was committed')\n"
"end\n"
"local rp0 = H + 2 * nc + 2 * (ncnt + nrec) + 1\n"
"local others = rp0 + 5 * nrp <= #ARGV\n"
"local bad = clash(KEYS[6], 'hash') or (ncnt > 0 and clash(KEYS[2], 'hash'))\n"
"  or (nrec > 0 and clash(KEYS[3], 'stream'))\n"
"  or (others and (clash(KEYS[4], 'stream') or clash(KEYS[5], 'zset')))\n"
"  or ((nc > 0 or others) and clash(DP .. dm_gen(RET, now), 'hash'))\n"
"for b = rp0, rp0 + 5 * (nrp - 1), 5 do\n"
"  bad = bad or clash(ARGV[b + 2], 'string')\n"
"end\n"
"if bad then return bad end\n"
"if nc > 0 or others then\n"
"  local fs = {}\n"
"  for j = 1, nc do fs[j] = ARGV[H + nc + j] end\n"
"  local i = rp0 + 5 * nrp\n"
"  while i <= #ARGV do\n"
"    local op, k = ARGV[i], tonumber(ARGV[i + 2])\n"
"    if op == 'R' then i = i + 7\n"
"    elseif op == 'D' or op == 'E' then i = i + 5\n"
"    else\n"
"      if k > 0 and op ~= 'X' then fs[#fs + 1] = ARGV[i + 4] end\n"
"      i = i + 11\n"
"    end\n"
"  end\n"
"  dm_touch(DP, RET, now, fs, LOAD, {})\n"
"end\n"
"local st\n"
"local function mark(f)\n"
"  if not st then st = dm_cur(DP, RET, now) end\n"
"  dm_mark(st, f)\n"
"end\n"
"local stc, out, dels = {}, {}, {}\n"
"local function bump(k, n) stc[k] = (stc[k] or 0) + n end\n"
"if nc > 0 then\n"
"  for j = 1, nc do mark(ARGV[H + nc + j]) end\n"
"  redis.call('DEL', unpack(KEYS, 7, 6 + nc))\n"
"  redis.call('XACK', S, G, unpack(ARGV, H + 1, H + nc))\n"
"  bump('processed', nc)\n"
"end\n"
"local i = H + 2 * nc + 1\n"
"for j = 1, ncnt do\n"
"  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2\n"
"end\n"
"for j = 1, nrec do\n"
"  redis.call('XADD', KEYS[3], '*', 'id', ARGV[i], 'r', ARGV[i + 1])\n"
"  i = i + 2\n"
"end\n"
"i = i + 5 * nrp\n"
"local n = 0\n"
"while i <= #ARGV do\n"
"  local op, entry, k, id, f = ARGV[i], ARGV[i+1], tonumber(ARGV[i+2]),\n"
"                             ARGV[i+3], ARGV[i+4]\n"
"  i = i + 5\n"
"  n = n + 1\n"
"  local r = -1\n"
"  local ok = k == 0 or cur[k - 6] == pre .. entry\n"
"  if op == 'D' or op == 'E' then\n"
"    r = redis.call('XACK', S, G, entry)\n"
"    bump('duplicates', r)\n"
"    if op == 'E' then bump('duplicate_replies', r) end\n"
"  elseif op == 'R' then\n"
"    local delay, member = tonumber(ARGV[i]), ARGV[i+1]; i = i + 2\n"
"    if ok then\n"
"      dels[#dels + 1] = KEYS[k]\n"
"      redis.call('ZADD', KEYS[5], now + delay, member)\n"
"      redis.call('XACK', S, G, entry)\n"
"      bump('retried', 1); r = 1\n"
"    end\n"
"  else\n"
"    local reason, err, att, ev, src, first = ARGV[i], ARGV[i+1],\n"
"      ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5]\n"
"    i = i + 6\n"
"    if ok then\n"
"      if k > 0 then\n"
"        if op ~= 'X' then mark(f) end\n"
"        dels[#dels + 1] = KEYS[k]\n"
"      end\n"
"      r = redis.call('XACK', S, G, entry)\n"
"      if r == 1 then\n"
"        redis.call('XADD', KEYS[4], '*', 'id', id, 'reason', reason,\n"
"          'error', err, 'attempts', att, 'event', ev, 'source', src,\n"
"          'first_seen', first, 'last_seen', now)\n"
"        bump('dead', 1); bump('dead:' .. reason, 1)\n"
"        if op == 'L' or op == 'T' then bump('late_replies', 1) end\n"
"        if op == 'T' then bump('timeouts', 1) end\n"
"      end\n"
"    end\n"
"  end\n"
"  if r < 0 then bump('fenced', 1) end\n"
"  out[n] = r\n"
"end\n"
"if #dels > 0 then redis.call('DEL', unpack(dels)) end\n"
"if st then dm_finish(st, RET, LOAD) end\n"
"local nreq, ndup, nrep, state, sent = 0, 0, 0, {}, {}\n"
"local function usable(to)\n"
"  if state[to] == nil then\n"
"    if clash(to, 'stream') or clash(to .. ':stats', 'hash') then\n"
"      state[to] = 'replies_undeliverable'\n"
"    elseif redis.call('EXISTS', to .. ':gone') == 1 then\n"
"      state[to] = 'replies_dropped'\n"
"    else state[to] = true end\n"
"  end\n"
"  return state[to]\n"
"end\n"
"for b = rp0, rp0 + 5 * (nrp - 1), 5 do\n"
"  local w, to, ck = tonumber(ARGV[b]), ARGV[b + 1], ARGV[b + 2]\n"
"  local head, body = ARGV[b + 3], ARGV[b + 4]\n"
"  if w > 0 or out[-w] == 1 then\n"
"    local dup = body == ''\n"
"    if dup then\n"
"      body = redis.call('GET', ck)\n"
"    else\n"
"      redis.call('SET', ck, body, 'PX', RTTL)\n"
"      nreq = nreq + 1\n"
"    end\n"
"    local u = body and usable(to)\n"
"    if u == true then\n"
"      redis.call('XADD', to, '*', 'e', head .. body, 's', RSRC)\n"
"      sent[to] = (sent[to] or 0) + 1\n"
"      nrep = nrep + 1\n"
"      if dup then ndup = ndup + 1 end\n"
"    elseif u then bump(u, 1) end\n"
"  end\n"
"end\n"
"for to, n in pairs(sent) do\n"
"  redis.call('HINCRBY', to .. ':stats', 'sent', n)\n"
"end\n"
"bump('requests', nreq); bump('replies', nrep)\n"
"bump('duplicate_replies', ndup)\n"
"for key, d in pairs(stc) do\n"
"  if d ~= 0 then redis.call('HINCRBY', KEYS[6], key, d) end\n"
"end\n"
"return {1, out, nreq, ndup, nrep}\n",

/* PROMOTE. KEYS: [1] stream [2] delayed. ARGV[1]: max. Moves due retries
 * back into the stream; returns how many. */
"local t = redis.call('TIME')\n"
"local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
"local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0,\n"
"                       tonumber(ARGV[1]))\n"
"for _, m in ipairs(due) do\n"
"  local p1 = string.find(m, '\\n', 1, true)\n"
"  local p2 = string.find(m, '\\n', p1 + 1, true)\n"
"  local p3 = string.find(m, '\\n', p2 + 1, true)\n"
"  local p4 = string.find(m, '\\n', p3 + 1, true)\n"
"  redis.call('XADD', KEYS[1], '*', 'e', string.sub(m, p4 + 1),\n"
"    's', string.sub(m, p3 + 1, p4 - 1), 'a', string.sub(m, p1 + 1, p2 - 1),\n"
"    'f', string.sub(m, p2 + 1, p3 - 1))\n"
"  redis.call('ZREM', KEYS[2], m)\n"
"end\n"
"return #due\n",

/* DRAIN. KEYS: [1] stream [2] delayed [3] meta. ARGV[1]: group [2] the
 * stream's epoch. Returns {pending with any consumer, delayed, 1 if
 * entries not delivered to the group}, or the error ONCEQLOST when the
 * epoch is gone: an empty stream is then not drained but lost (a restart
 * without persistence, FLUSHALL), and the run must not end as if it had
 * done everything. */
"if redis.call('HGET', KEYS[3], 'epoch') ~= ARGV[2] then\n"
"  return redis.error_reply('ONCEQLOST the epoch of ' .. KEYS[1] ..\n"
"    ' is gone')\n"
"end\n"
"local p = redis.call('XPENDING', KEYS[1], ARGV[1])[1]\n"
"local d = redis.call('ZCARD', KEYS[2])\n"
"local last = '0-0'\n"
"for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do\n"
"  local name, ld\n"
"  for j = 1, #g, 2 do\n"
"    if g[j] == 'name' then name = g[j + 1] end\n"
"    if g[j] == 'last-delivered-id' then ld = g[j + 1] end\n"
"  end\n"
"  if name == ARGV[1] then last = ld end\n"
"end\n"
"local more = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)\n"
"return {p, d, #more}\n",

/* SEND. KEYS: [1] stream [2] stats [3] meta. ARGV[1]: window ms (0: off)
 * [2] the stream's epoch [3] a request context's TTL (ms) [4] "1": refuse
 * a request whose context key exists (its correlation id is another
 * request's) [5] the dedup marks' prefix DDP (S:dd:) [6] marks per bucket
 * before a split, then per event: mark line source big ck ctx (mark: ""
 * or the id's 12 digest bytes, as a done-mark's; big: "" or the full
 * length of a cut line; ck: "" or the key of a request's context, set to
 * ctx when the event is sent). The dedup marks are done-marks (DM_LUA)
 * with the window as their retention: generation g of the window's
 * length, a lookup in it and the one before, each expiring 2 windows
 * after its start; so a mark rejects its id for at least the window and
 * at most twice it, in buckets of about 20 bytes an id (one key of its
 * own per id, with PX, cost about 130). Returns {sent, rejected, refused:
 * correlation id in use}. Before any write: the epoch must still
 * be there (else the stream's data was lost since we started: error
 * ONCEQLOST, nothing sent), and the keys it writes must have their types
 * (else WRONGTYPE, nothing sent: a script stopped by an error halfway
 * keeps its first writes). */
DM_LUA
"local t1, t2 = redis.call('TYPE', KEYS[1])['ok'],\n"
"  redis.call('TYPE', KEYS[2])['ok']\n"
"if redis.call('HGET', KEYS[3], 'epoch') ~= ARGV[2] then\n"
"  return redis.error_reply('ONCEQLOST the epoch of ' .. KEYS[1] ..\n"
"    ' is gone')\n"
"end\n"
"if (t1 ~= 'none' and t1 ~= 'stream') or (t2 ~= 'none' and t2 ~= 'hash') then\n"
"  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' is a ' .. t1 ..\n"
"    ' and ' .. KEYS[2] .. ' a ' .. t2 .. ' (a stream and a hash needed: ' ..\n"
"    'another stream\\'s name clashes with them); nothing was sent')\n"
"end\n"
"local w, excl = tonumber(ARGV[1]), ARGV[4] == '1'\n"
"local gens, st\n"
"if w > 0 then\n"
"  local now, fs = dm_now(), {}\n"
"  for j = 7, #ARGV, 6 do\n"
"    if ARGV[j] ~= '' then fs[#fs + 1] = ARGV[j] end\n"
"  end\n"
"  dm_touch(ARGV[5], w, now, fs, tonumber(ARGV[6]),\n"
"           dm_gens(ARGV[5], w, now))\n"
"  st = dm_cur(ARGV[5], w, now)\n"
"  gens = dm_gens(ARGV[5], w, now)\n"
"end\n"
"local sent, rej, inuse = 0, 0, 0\n"
"local i = 7\n"
"while i <= #ARGV do\n"
"  local mark, line, src, big = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]\n"
"  local ck, ctx = ARGV[i+4], ARGV[i+5]\n"
"  i = i + 6\n"
"  local dedup = mark ~= '' and w ~= 0\n"
"  if dedup and dm_done(gens, mark) then\n"
"    rej = rej + 1\n"
"  elseif excl and ck ~= '' and redis.call('EXISTS', ck) == 1 then\n"
"    inuse = inuse + 1\n"
"  else\n"
"    if dedup then dm_mark(st, mark) end\n"
"    if big == '' then redis.call('XADD', KEYS[1], '*', 'e', line, 's', src)\n"
"    else redis.call('XADD', KEYS[1], '*', 'e', line, 's', src, 'big', big)\n"
"    end\n"
"    if ck ~= '' then redis.call('SET', ck, ctx, 'PX', ARGV[3]) end\n"
"    sent = sent + 1\n"
"  end\n"
"end\n"
"if st then dm_finish(st, w, tonumber(ARGV[6])) end\n"
"if sent > 0 then redis.call('HINCRBY', KEYS[2], 'sent', sent) end\n"
"if rej > 0 then redis.call('HINCRBY', KEYS[2], 'rejected', rej) end\n"
"return {sent, rej, inuse}\n",

/* REDRIVE. KEYS: [1] stream [2] dlq [3] stats [4] id key. ARGV: dlq entry
 * id, event, source, reason, the id's mark field, the done-marks' prefix
 * DP, retention (ms). A handler FAIL or max attempts settled the id (with
 * no effect): unsettle it (its mark in either generation, and a "D" of the
 * layout before the buckets), or the redriven copy would be a
 * duplicate. */
DM_LUA
"local unsettle = ARGV[4] == 'failed' or ARGV[4] == 'max_attempts'\n"
"local marks = {}\n"
"if unsettle and ARGV[5] ~= '' then\n"
"  for _, s in ipairs(dm_gens(ARGV[6], tonumber(ARGV[7]), dm_now())) do\n"
"    marks[#marks + 1] = dm_addr(s, ARGV[5])\n"
"    redis.call('EXISTS', marks[#marks])\n"
"  end\n"
"end\n"
"if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return 0 end\n"
"if unsettle then\n"
"  if redis.call('GET', KEYS[4]) == 'D' then redis.call('DEL', KEYS[4]) end\n"
"  for _, a in ipairs(marks) do redis.call('HDEL', a, ARGV[5]) end\n"
"end\n"
"redis.call('XADD', KEYS[1], '*', 'e', ARGV[2], 's', ARGV[3])\n"
"redis.call('HINCRBY', KEYS[3], 'sent', 1)\n"
"redis.call('HINCRBY', KEYS[3], 'redriven', 1)\n"
"return 1\n",

/* BEAT (a heartbeat). KEYS: [1] stream [2] the id key. ARGV: [1] group
 * [2] consumer [3] our token [4] the stream entry [5] the lease (ms).
 * Only while the key still holds our token: its PX becomes a whole lease,
 * and the entry's idle time goes back to 0 (XCLAIM JUSTID: the delivery
 * count is not raised), so neither the claim expires nor XAUTOCLAIM hands
 * the entry over for another lease. 1 extended, 0 not ours any more (it
 * was settled, released, or taken over: nothing is touched). */
"if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end\n"
"redis.call('PEXPIRE', KEYS[2], ARGV[5])\n"
"redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'JUSTID')\n"
"return 1\n",

/* TRIM. KEYS: [1] stream. Removes the entries that every group of the
 * stream has settled: those before the oldest entry any group still has
 * pending (XPENDING's smallest id) or not yet delivered (after its
 * last-delivered-id). Without a group nothing is trimmed (only `send` has
 * run: every entry is still to come). MINID ~ removes whole nodes of the
 * stream (cheap) and never an entry at or after the threshold; LIMIT 0
 * lets it catch up with a large backlog at once. Returns the entries
 * removed. */
"local groups = redis.call('XINFO', 'GROUPS', KEYS[1])\n"
"if #groups == 0 then return 0 end\n"
"local function parse(id)\n"
"  local ms, sq = string.match(id, '^(%d+)-(%d+)$')\n"
"  return tonumber(ms), tonumber(sq)\n"
"end\n"
"local best, bm, bs\n"
"for _, g in ipairs(groups) do\n"
"  local name, ld\n"
"  for j = 1, #g, 2 do\n"
"    if g[j] == 'name' then name = g[j + 1] end\n"
"    if g[j] == 'last-delivered-id' then ld = g[j + 1] end\n"
"  end\n"
"  local p = redis.call('XPENDING', KEYS[1], name)\n"
"  local t = ld\n"
"  if p[1] > 0 then t = p[2] end\n"
"  local m, q = parse(t)\n"
"  if not best or m < bm or (m == bm and q < bs) then\n"
"    best, bm, bs = t, m, q\n"
"  end\n"
"end\n"
"if bm == 0 and bs == 0 then return 0 end\n"
"return redis.call('XTRIM', KEYS[1], 'MINID', '~', best, 'LIMIT', 0)\n",
};

/* ======================================================= argument lists */

/* A growable list of binary-safe arguments (offsets into one buffer, so a
 * batch of thousands of arguments costs two allocations). */
typedef struct abuf {
    char *buf;
    size_t len, cap;
    size_t *off, *alen;
    size_t n, ncap;
    int oom;
} abuf;

static void ab_reset(abuf *a)
{
    a->len = a->n = 0;
    a->oom = 0;
}

static void ab_free(abuf *a)
{
    oq__free(a->buf);
    oq__free(a->off);
    oq__free(a->alen);
    memset(a, 0, sizeof(*a));
}

static void ab_add(abuf *a, const void *p, size_t len)
{
    if (a->oom)
        return;
    if (a->len + len > a->cap) {
        size_t ncap = a->cap ? a->cap : 4096;
        char *nb;
        while (ncap < a->len + len)
            ncap *= 2;
        if ((nb = oq__realloc(a->buf, ncap)) == NULL) {
            a->oom = 1;
            return;
        }
        a->buf = nb;
        a->cap = ncap;
    }
    if (a->n == a->ncap) {
        size_t ncap = a->ncap ? a->ncap * 2 : 64;
        size_t *no = oq__realloc(a->off, ncap * sizeof(*no));
        size_t *nl;
        if (no == NULL) {
            a->oom = 1;
            return;
        }
        a->off = no;
        if ((nl = oq__realloc(a->alen, ncap * sizeof(*nl))) == NULL) {
            a->oom = 1;
            return;
        }
        a->alen = nl;
        a->ncap = ncap;
    }
    if (len)
        memcpy(a->buf + a->len, p, len);
    a->off[a->n] = a->len;
    a->alen[a->n++] = len;
    a->len += len;
}

static void ab_adds(abuf *a, const char *s)
{
    ab_add(a, s, strlen(s));
}

static void ab_addu(abuf *a, uint64_t v)
{
    char b[24];
    int n = snprintf(b, sizeof(b), "%" PRIu64, v);
    ab_add(a, b, (size_t)n);
}

static void ab_addi(abuf *a, int64_t v)
{
    char b[24];
    int n = snprintf(b, sizeof(b), "%" PRId64, v);
    ab_add(a, b, (size_t)n);
}

/* Adds one argument made of two parts (a key prefix and an id). */
static void ab_add2(abuf *a, const char *p, size_t plen, const char *q,
                    size_t qlen)
{
    size_t start;
    if (a->oom)
        return;
    ab_add(a, p, plen);
    if (a->oom || qlen == 0)
        return;
    /* Extend the last argument in place. */
    start = a->off[a->n - 1];
    a->n--;
    a->len = start;
    {
        size_t need = plen + qlen;
        if (a->len + need > a->cap) {
            size_t ncap = a->cap;
            char *nb;
            while (ncap < a->len + need)
                ncap *= 2;
            if ((nb = oq__realloc(a->buf, ncap)) == NULL) {
                a->oom = 1;
                return;
            }
            a->buf = nb;
            a->cap = ncap;
        }
        memcpy(a->buf + start + plen, q, qlen);
        a->off[a->n] = start;
        a->alen[a->n++] = need;
        a->len = start + need;
    }
}

/* ============================================================ the URL */

/* One server. */
typedef struct rnode {
    char host[256];
    int port;
    char user[256];
    char pass[256];
    int db;
    char text[280];     /* host:port, for messages */
} rnode;

/* --redis URL[,URL...]: a primary and its replicas. Every connection
 * looks for the primary among them when it (re)connects, from the one
 * last found (cur, shared by the process's connections): a failover is
 * followed (docs/REDIS.md). */
#define MAX_NODES 8
typedef struct rurl {
    rnode node[MAX_NODES];
    unsigned n;
    _Atomic unsigned cur;
    /* A Redis Cluster (found by the first connection): the servers are
     * seeds, any node of it; a connection goes where MOVED or ASK sends
     * it (rc_follow), and back to the seeds when that node is gone. */
    atomic_bool cluster;
    atomic_bool remap;          /* a MOVED was followed: the partitions'
                                   primaries (rrun's map) may have changed */
} rurl;

/* The server last found to be the primary, for messages. */
static const char *url_text(rurl *u)
{
    return u->node[atomic_load(&u->cur) % u->n].text;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Copies s[0..n) percent-decoded into out; -1 if it does not fit, or a
 * '%' is not followed by two hex digits (RFC 3986: a literal '%' is
 * %25; taking "%zz" as it is would guess). */
static int pct_decode(const char *s, size_t n, char *out, size_t outlen)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            if (i + 2 >= n || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0)
                return -1;
            c = hexval(s[i + 1]) * 16 + hexval(s[i + 2]);
            i += 2;
        }
        if (o + 1 >= outlen)
            return -1;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return 0;
}

/*
 * Reads the password from pwfile (--redis-password-file): its content,
 * one trailing newline (or CRLF) stripped. A password in a file is out of
 * sight of ps, like REDISCLI_AUTH, and unlike a variable it is not
 * inherited by every child (exec: handlers). A file other users may read
 * gets a warning on stderr (the password is as safe as the file; ssh
 * refuses such keys, but secrets mounted by an orchestrator are often
 * 0644, and refusing them would push the password back onto the command
 * line). 0, or -1 with a message (never the password).
 */
static int read_password_file(const char *pwfile, const char *cmd, rnode *u,
                              char *err, size_t errlen)
{
    FILE *f = fopen(pwfile, "rbe");
    struct stat sb;
    size_t n;
    bool loose;

    if (f == NULL) {
        snprintf(err, errlen, "cannot read --redis-password-file '%s': %s",
                 pwfile, strerror(errno));
        return -1;
    }
    n = fread(u->pass, 1, sizeof(u->pass), f);
    loose = fstat(fileno(f), &sb) == 0 && (sb.st_mode & S_IROTH);
    fclose(f);
    if (n == sizeof(u->pass)) {
        snprintf(err, errlen, "the password in --redis-password-file '%s' "
                 "is too long (at most %zu bytes)", pwfile,
                 sizeof(u->pass) - 2);
        memset(u->pass, 0, sizeof(u->pass));
        return -1;
    }
    u->pass[n] = '\0';
    if (n > 0 && u->pass[n - 1] == '\n')
        u->pass[--n] = '\0';
    if (n > 0 && u->pass[n - 1] == '\r')
        u->pass[--n] = '\0';
    if (n == 0 || memchr(u->pass, '\0', n) || memchr(u->pass, '\n', n)) {
        snprintf(err, errlen, "--redis-password-file '%s' %s", pwfile,
                 n == 0 ? "is empty" : "holds more than one line");
        memset(u->pass, 0, sizeof(u->pass));
        return -1;
    }
    if (loose)
        fprintf(stderr, "onceq %s: warning: --redis-password-file '%s' is "
                "readable by every user of this machine (chmod 600 it)\n",
                cmd, pwfile);
    return 0;
}

/* redis://[[user]:pass@]host[:port][/db]; the password, when the URL has
 * none, from pwfile (--redis-password-file, may be NULL) or else from
 * $REDISCLI_AUTH. 0, or -1 with a message (which never shows a
 * password). */
static int parse_node(const char *url, const char *pwfile, const char *cmd,
                      rnode *u, char *err, size_t errlen)
{
    const char *p, *at, *hostend, *slash;
    size_t hl;

    memset(u, 0, sizeof(*u));
    u->port = 6379;
    if (strncmp(url, "rediss://", 9) == 0) {
        /* Debian 12's hiredis is built without hiredis_ssl: refused, with
         * the way that works, rather than a plain connection. */
        snprintf(err, errlen, "rediss:// (TLS) is not supported: Debian "
                 "12's hiredis has no TLS; reach Redis through a TLS tunnel "
                 "(stunnel, in Debian: a local port that forwards to the "
                 "server's TLS port) and give redis://127.0.0.1:PORT");
        return -1;
    }
    if (strncmp(url, "redis://", 8) != 0)
        goto bad;
    p = url + 8;
    slash = strchr(p, '/');
    at = memchr(p, '@', slash ? (size_t)(slash - p) : strlen(p));
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon == NULL) {
            /* redis://pass@host: a password alone */
            if (pct_decode(p, (size_t)(at - p), u->pass, sizeof(u->pass)))
                goto bad;
        } else if (pct_decode(p, (size_t)(colon - p), u->user,
                              sizeof(u->user)) ||
                   pct_decode(colon + 1, (size_t)(at - colon - 1), u->pass,
                              sizeof(u->pass))) {
            goto bad;
        }
        p = at + 1;
    }
    if (*p == '[') {
        const char *close = strchr(p, ']');
        if (close == NULL)
            goto bad;
        hl = (size_t)(close - p - 1);
        if (hl == 0 || hl >= sizeof(u->host))
            goto bad;
        memcpy(u->host, p + 1, hl);
        hostend = close + 1;
    } else {
        hostend = p + strcspn(p, ":/");
        hl = (size_t)(hostend - p);
        if (hl == 0 || hl >= sizeof(u->host))
            goto bad;
        memcpy(u->host, p, hl);
    }
    u->host[hl] = '\0';
    p = hostend;
    if (*p == ':') {
        char num[16];
        size_t n = strcspn(p + 1, "/");
        uint64_t port;
        if (n >= sizeof(num))
            goto bad;
        memcpy(num, p + 1, n);
        num[n] = '\0';
        if (oq__parse_count(num, 1, 65535, &port) != 0)
            goto bad;
        u->port = (int)port;
        p += 1 + n;
    }
    if (*p == '/') {
        uint64_t db;
        /* redis://host/ is db 0; the number is the rest of the URL. */
        if (p[1] != '\0') {
            if (oq__parse_count(p + 1, 0, 1000000, &db) != 0)
                goto bad;
            u->db = (int)db;
        }
        p += strlen(p);
    }
    if (*p != '\0')
        goto bad;
    {
        char text[sizeof(u->text)];
        snprintf(text, sizeof(text), "%.255s:%d", u->host, u->port);
        memcpy(u->text, text, sizeof(text));
    }
    if (pwfile) {
        if (u->pass[0]) {
            snprintf(err, errlen, "a password in the URL and "
                     "--redis-password-file: give it once");
            return -1;
        }
        return read_password_file(pwfile, cmd, u, err, errlen);
    }
    /* A password in the URL is on the command line, which every user of
     * the machine can read (ps); redis-cli's REDISCLI_AUTH keeps it out of
     * sight. The URL's own password wins, as with redis-cli -a. */
    if (u->pass[0] == '\0') {
        const char *env = getenv("REDISCLI_AUTH");
        if (env && *env) {
            if (strlen(env) >= sizeof(u->pass)) {
                snprintf(err, errlen, "the password in REDISCLI_AUTH is too "
                         "long (at most %zu bytes)", sizeof(u->pass) - 1);
                return -1;
            }
            snprintf(u->pass, sizeof(u->pass), "%s", env);
        }
    }
    return 0;
bad:
    {
        /* Never the password: what is before an '@' is left out. */
        const char *sch = strstr(url, "://"), *at2 = strrchr(url, '@');
        if (sch && at2 && at2 > sch)
            snprintf(err, errlen, "bad Redis URL '%.*s***%.300s' (expected "
                     "redis://[user:password@]host[:port][/db][,URL...])",
                     (int)(sch + 3 - url), url, at2);
        else
            snprintf(err, errlen, "bad Redis URL '%.300s' (expected "
                     "redis://[user:password@]host[:port][/db][,URL...])",
                     url);
    }
    return -1;
}

/* The comma-separated list of URLs of --redis (at most MAX_NODES). A
 * password file warns once. 0, or -1 with a message. */
static int parse_url(const char *list, const char *pwfile, const char *cmd,
                     rurl *u, char *err, size_t errlen)
{
    const char *p = list;

    memset(u, 0, sizeof(*u));
    for (;;) {
        char one[1024];
        /* URLs are split where the next one starts (",redis://"), so a
         * password may hold a comma. */
        const char *next = strstr(p, ",redis://");
        const char *next2 = strstr(p, ",rediss://");
        size_t n;
        if (next == NULL || (next2 && next2 < next))
            next = next2;
        n = next ? (size_t)(next - p) : strlen(p);
        if (u->n == MAX_NODES) {
            snprintf(err, errlen, "at most %d Redis URLs (a primary and its "
                     "replicas)", MAX_NODES);
            return -1;
        }
        if (n >= sizeof(one)) {
            snprintf(err, errlen, "bad Redis URL (longer than %zu bytes)",
                     sizeof(one) - 1);
            return -1;
        }
        memcpy(one, p, n);
        one[n] = '\0';
        if (parse_node(one, u->n ? NULL : pwfile, cmd, &u->node[u->n], err,
                       errlen) != 0)
            return -1;
        if (u->n && pwfile)
            memcpy(u->node[u->n].pass, u->node[0].pass,
                   sizeof(u->node[0].pass));
        if (u->n && u->node[u->n].db != u->node[0].db) {
            snprintf(err, errlen, "the Redis URLs name different databases "
                     "(/%d and /%d): a primary and its replicas hold one",
                     u->node[0].db, u->node[u->n].db);
            return -1;
        }
        u->n++;
        if (p[n] != ',')
            return 0;
        p += n + 1;
    }
}

/* ======================================================== connections */

/* RC_WAIT: the server answered "not now" (see is_transient): try again
 * later, as after a lost connection. */
enum { RC_OK = 0, RC_IO = -1, RC_FATAL = -2, RC_WAIT = -3 };

/* One connection; used by one thread. */
typedef struct rconn {
    const rnode *u;              /* the server connected to (or last tried) */
    rurl *urls;                  /* the servers to look for the primary in */
    redisContext *c;
    char name[320];              /* CLIENT SETNAME, so an operator (or a
                                    test) can find our connections */
    char sha[SC__COUNT][41];
    const char **av;
    size_t *al;
    size_t avcap;
    const atomic_int *stop;      /* stop reconnecting when set; may be NULL */
    atomic_int *reconnects;      /* counted here; may be NULL */
    const char *meta;            /* S:meta, and the stream's epoch there as */
    const char *epoch;           /* first seen: checked at every (re)connect;
                                    NULL or "": not (yet) known */
    const char *stream;          /* S, for the message when it is lost */
    unsigned opens;              /* successful rc_opens: tells a caller
                                    that the connection was replaced */
    bool is_primary;             /* rc_open_node got past ROLE */
    bool cluster_node;           /* rc_open_node: cluster_enabled:1 */
    rnode moved;                 /* the node a redirection named (rc->u
                                    then points here) */
    bool ready;                  /* opened once (pconn): rc_cmd and
                                    rc_script reconnect it from then on */
    char err[1024];              /* the last fatal error */
} rconn;

static int64_t mono_ms(void)
{
    return oq_clock_now(NULL);
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void nap_ms(int64_t ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int is_err(const redisReply *r, const char *prefix)
{
    return r && r->type == REDIS_REPLY_ERROR &&
           strncmp(r->str, prefix, strlen(prefix)) == 0;
}

/*
 * Error replies that mean "not now" rather than "no": the server refused
 * the command before running it, so it had no effect, and the same call
 * succeeds later. LOADING: a restarted server is reading its AOF or RDB.
 * BUSY: a script (anyone's) runs past busy-reply-threshold. TRYAGAIN: keys
 * being moved between nodes. READONLY: after a failover we talk to the old
 * master, now a replica; a new connection (the name resolved again) may
 * reach the new one, and a write never runs on a replica (in a script the
 * first write fails, so the script has written nothing). CLUSTERDOWN: a
 * Redis Cluster without a primary for some slot (one failed, not yet
 * replaced or back) refuses every command. "non local key": a script
 * read a key (a done-mark bucket, named by its arguments, not its KEYS)
 * of a slot being moved to another node; every script reads each key it
 * will write before its first write (dm_touch), so it has written
 * nothing, and the call succeeds once the slot has moved. UNBLOCKED: a
 * blocked XREADGROUP whose stream was moved to another node (or deleted)
 * meanwhile; it delivered nothing. The callers back off and
 * reconnect, as after a lost connection, within the same limit.
 */
static int is_transient(const redisReply *r)
{
    return is_err(r, "LOADING") || is_err(r, "BUSY ") ||
           is_err(r, "TRYAGAIN") || is_err(r, "READONLY") ||
           is_err(r, "CLUSTERDOWN") || is_err(r, "UNBLOCKED") ||
           is_err(r, "ERR Script attempted to access a non local key");
}

/* The message for a stream whose data was lost: the run stops rather than
 * start the stream over (which would end a --drain with events lost). */
static void lost_message(char *out, size_t len, const char *where,
                         const char *stream)
{
    snprintf(out, len, "the Redis data of stream '%s' at %s was lost "
             "(restart without persistence, or FLUSHALL?); stopping, not "
             "starting it over", stream, where);
}

/* Notes a transient error reply in rc->err (rc_reconnect may give up with
 * it) and frees it. */
static void note_transient(rconn *rc, redisReply *r)
{
    snprintf(rc->err, sizeof(rc->err), "Redis at %s: %s", rc->u->text,
             r->str);
    freeReplyObject(r);
}

/* Points rc at host:port (a node of the cluster), with the credentials of
 * the first server given. */
static void set_target(rconn *rc, const char *host, size_t hlen, int port)
{
    rnode *m = &rc->moved;

    *m = rc->urls->node[0];
    m->db = 0;
    memcpy(m->host, host, hlen);
    m->host[hlen] = '\0';
    m->port = port;
    snprintf(m->text, sizeof(m->text), "%s:%d", m->host, port);
    rc->u = m;
}

/* A Redis Cluster's redirection, "MOVED slot host:port" (the slot is on
 * another node now) or "ASK slot host:port" (it is being moved: this call
 * there, after ASKING). Points rc at that node and frees r: 1 for MOVED,
 * 2 for ASK; 0 (r untouched) for any other reply. */
static int redirect(rconn *rc, redisReply *r)
{
    int ask = is_err(r, "ASK ");
    const char *hp, *colon;
    long port;

    if (rc->urls == NULL || (!ask && !is_err(r, "MOVED ")))
        return 0;
    hp = strchr(r->str + (ask ? 4 : 6), ' ');
    colon = hp ? strrchr(hp, ':') : NULL;
    if (colon == NULL || colon - hp - 1 < 0 ||
        (size_t)(colon - hp - 1) >= sizeof(rc->moved.host) ||
        (port = strtol(colon + 1, NULL, 10)) <= 0 || port > 65535)
        return 0;
    if (colon == hp + 1) {
        /* No host ("MOVED slot :port", an unknown endpoint): the node's
         * that answered. */
        char host[sizeof(rc->moved.host)];
        snprintf(host, sizeof(host), "%s", rc->u->host);
        set_target(rc, host, strlen(host), (int)port);
    } else {
        set_target(rc, hp + 1, (size_t)(colon - hp - 1), (int)port);
    }
    freeReplyObject(r);
    return ask ? 2 : 1;
}

/* Drops a connection that did not open: nothing may be sent on one that
 * was not checked (a server that lost the stream's data, one still
 * loading, a stale primary); the next call opens it again. */
static void drop(rconn *rc)
{
    if (rc->c)
        redisFree(rc->c);
    rc->c = NULL;
}

/* Connects to rc->u, authenticates, selects the db, checks the server
 * (with several servers: that it is the primary) and loads the scripts.
 * RC_OK, RC_IO or RC_WAIT (try again later) or RC_FATAL (bad config);
 * rc->err says why. */
static int rc_open_node(rconn *rc)
{
    struct timeval tv = { 2, 0 };
    redisReply *r = NULL;
    const char *v;
    int major = 0, minor = 0;

    if (rc->c) {
        redisFree(rc->c);
        rc->c = NULL;
    }
    rc->is_primary = false;
    rc->c = redisConnectWithTimeout(rc->u->host, rc->u->port, tv);
    if (rc->c == NULL || rc->c->err) {
        snprintf(rc->err, sizeof(rc->err), "cannot connect to Redis at %s: %s",
                 rc->u->text, rc->c ? rc->c->errstr : "out of memory");
        drop(rc);
        return RC_IO;
    }
    /* The opening commands answer at once (LOADING, BUSY included): 10 s
     * of silence is not a Redis server. */
    tv.tv_sec = 10;
    redisSetTimeout(rc->c, tv);
    redisEnableKeepAlive(rc->c);
    if (rc->u->pass[0]) {
        if (rc->u->user[0])
            r = redisCommand(rc->c, "AUTH %s %s", rc->u->user, rc->u->pass);
        else
            r = redisCommand(rc->c, "AUTH %s", rc->u->pass);
        if (r == NULL)
            goto io;
        if (is_transient(r))
            goto wait;
        if (r->type == REDIS_REPLY_ERROR) {
            snprintf(rc->err, sizeof(rc->err),
                     "Redis at %s refused AUTH: %s", rc->u->text, r->str);
            goto fatal;
        }
        freeReplyObject(r);
    }
    r = redisCommand(rc->c, "INFO server");
    if (r == NULL)
        goto io;
    if (is_transient(r))
        goto wait;
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(rc->err, sizeof(rc->err), "Redis at %s: %s%s", rc->u->text,
                 r->str, is_err(r, "NOAUTH") ?
                 " (give a password: set REDISCLI_AUTH, or "
                 "redis://:PASSWORD@host:port)" : "");
        goto fatal;
    }
    v = r->type == REDIS_REPLY_STRING ? strstr(r->str, "redis_version:")
                                      : NULL;
    if (v == NULL || sscanf(v + 14, "%d.%d", &major, &minor) != 2 ||
        major < 6 || (major == 6 && minor < 2)) {
        snprintf(rc->err, sizeof(rc->err), "Redis at %s is version %.*s; "
                 "onceq needs 6.2 or later (streams with XAUTOCLAIM)",
                 rc->u->text, v ? (int)strcspn(v + 14, "\r\n") : 7,
                 v ? v + 14 : "unknown");
        goto fatal;
    }
    freeReplyObject(r);
    {
        /* Only the primary will do: a replica refuses writes (the one
         * that was primary may be a replica now, or the name may not
         * have moved yet), so it is waited out like -READONLY. */
        r = redisCommand(rc->c, "ROLE");
        if (r == NULL)
            goto io;
        if (is_transient(r))
            goto wait;
        /* A user not allowed ROLE (NOPERM) is taken to be on the
         * primary: its writes would meet -READONLY on a replica. */
        if (!is_err(r, "NOPERM") &&
            (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
             r->element[0]->type != REDIS_REPLY_STRING ||
             strcmp(r->element[0]->str, "master") != 0)) {
            snprintf(rc->err, sizeof(rc->err), "Redis at %s is not the "
                     "primary (ROLE: %s)", rc->u->text,
                     r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                     r->element[0]->type == REDIS_REPLY_STRING
                         ? r->element[0]->str : "?");
            freeReplyObject(r);
            drop(rc);
            return RC_WAIT;
        }
        freeReplyObject(r);
        rc->is_primary = true;
    }
    r = redisCommand(rc->c, "INFO cluster");
    if (r == NULL)
        goto io;
    if (is_transient(r))
        goto wait;
    rc->cluster_node = r->type == REDIS_REPLY_STRING &&
                       strstr(r->str, "cluster_enabled:1") != NULL;
    freeReplyObject(r);
    if (rc->u->db) {
        r = redisCommand(rc->c, "SELECT %d", rc->u->db);
        if (r == NULL)
            goto io;
        if (is_transient(r))
            goto wait;
        if (r->type == REDIS_REPLY_ERROR) {
            snprintf(rc->err, sizeof(rc->err), "Redis at %s: SELECT %d: %s",
                     rc->u->text, rc->u->db, r->str);
            goto fatal;
        }
        freeReplyObject(r);
    }
    if (rc->name[0]) {
        r = redisCommand(rc->c, "CLIENT SETNAME %s", rc->name);
        if (r == NULL)
            goto io;
        if (is_transient(r))
            goto wait;
        freeReplyObject(r);
    }
    /* The stream's epoch (S:meta's epoch field, written at its first use)
     * is checked at every reconnect: a server restarted without
     * persistence, or flushed, has lost the claims, the processed set and
     * the group; starting over would run events again, or end a --drain
     * with events lost. */
    if (rc->epoch && rc->epoch[0]) {
        r = redisCommand(rc->c, "HGET %s epoch", rc->meta);
        if (r == NULL)
            goto io;
        if (is_transient(r))
            goto wait;
        /* A cluster node without the stream's meta (MOVED, ASK): the
         * first call of the stream's keys goes on to the one with it,
         * which is checked when that connection opens. */
        if (!(rc->cluster_node &&
              (is_err(r, "MOVED ") || is_err(r, "ASK "))) &&
            (r->type != REDIS_REPLY_STRING ||
             strcmp(r->str, rc->epoch) != 0)) {
            if (r->type == REDIS_REPLY_ERROR)
                snprintf(rc->err, sizeof(rc->err), "Redis at %s: HGET %s: %s",
                         rc->u->text, rc->meta, r->str);
            else
                lost_message(rc->err, sizeof(rc->err), rc->u->text,
                             rc->stream);
            goto fatal;
        }
        freeReplyObject(r);
    }
    for (int i = 0; i < SC__COUNT; i++) {
        r = redisCommand(rc->c, "SCRIPT LOAD %s", script_text[i]);
        if (r == NULL)
            goto io;
        if (is_transient(r))
            goto wait;
        if (r->type != REDIS_REPLY_STRING || r->len != 40) {
            snprintf(rc->err, sizeof(rc->err), "Redis at %s: SCRIPT LOAD: %s",
                     rc->u->text, r->type == REDIS_REPLY_ERROR ? r->str
                                                              : "bad reply");
            goto fatal;
        }
        memcpy(rc->sha[i], r->str, 41);
        freeReplyObject(r);
    }
    /* Commands (XREADGROUP blocks BLOCK_MS at most) never take this long;
     * a longer silence is a dead peer: reconnect. */
    tv.tv_sec = 60;
    redisSetTimeout(rc->c, tv);
    rc->opens++;
    return RC_OK;
io:
    snprintf(rc->err, sizeof(rc->err), "lost the connection to Redis at %s: "
             "%s", rc->u->text,
             strcmp(rc->c->errstr, strerror(EAGAIN)) == 0
                 ? "no answer in 10 s (is it a Redis server?)"
                 : rc->c->errstr[0] ? rc->c->errstr : "closed");
    drop(rc);
    return RC_IO;
wait:
    note_transient(rc, r);
    drop(rc);
    return RC_WAIT;
fatal:
    freeReplyObject(r);
    drop(rc);
    return RC_FATAL;
}

/* Whether server u says it is a primary (ROLE), on a connection of its
 * own: 1 yes, 0 no or unreachable. */
static int says_primary(const rnode *u)
{
    struct timeval tv = { 1, 0 };
    redisContext *c = redisConnectWithTimeout(u->host, u->port, tv);
    redisReply *r = NULL;
    int yes = 0;

    if (c == NULL || c->err)
        goto out;
    redisSetTimeout(c, tv);
    if (u->pass[0]) {
        r = u->user[0] ? redisCommand(c, "AUTH %s %s", u->user, u->pass)
                       : redisCommand(c, "AUTH %s", u->pass);
        if (r == NULL || r->type == REDIS_REPLY_ERROR)
            goto out;
        freeReplyObject(r);
    }
    r = redisCommand(c, "ROLE");
    yes = r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
          r->element[0]->type == REDIS_REPLY_STRING &&
          strcmp(r->element[0]->str, "master") == 0;
out:
    freeReplyObject(r);
    if (c)
        redisFree(c);
    return yes;
}

/* rc_open on a Redis Cluster: the node rc points at (where the last
 * redirection sent it), else each seed in turn (that node is gone: a call
 * there is redirected to the one that took its slots). */
static int rc_open_cluster(rconn *rc)
{
    int st = RC_IO;

    for (unsigned k = 0; k <= rc->urls->n; k++) {
        if (k > 0)
            rc->u = &rc->urls->node[k - 1];
        if ((st = rc_open_node(rc)) == RC_OK || st == RC_FATAL)
            return st;
    }
    return st;
}

/* rc_open_node on the primary: with several servers, each is tried from
 * the one last found, and the first that is the primary is kept (and
 * remembered for the others), unless another one says it is the primary
 * too: a stale primary back after a failover (restarted, perhaps empty,
 * not yet demoted) must not take writes, so two primaries are waited out
 * like a failover in progress. */
static int rc_open(rconn *rc)
{
    unsigned n = rc->urls ? rc->urls->n : 1, start, fatal = 0;
    int st = RC_IO;
    char first[sizeof(rc->err)] = "", fatal_err[sizeof(rc->err)] = "";

    if (rc->urls && atomic_load(&rc->urls->cluster))
        return rc_open_cluster(rc);
    if (n <= 1) {
        if ((st = rc_open_node(rc)) == RC_OK && rc->cluster_node && rc->urls)
            atomic_store(&rc->urls->cluster, true);
        return st;
    }
    start = atomic_load(&rc->urls->cur);
    for (unsigned k = 0; k < n; k++) {
        unsigned i = (start + k) % n;
        rc->u = &rc->urls->node[i];
        st = rc_open_node(rc);
        if (st == RC_OK && rc->cluster_node) {
            /* Seeds of a cluster: every one is a primary. */
            atomic_store(&rc->urls->cluster, true);
            return RC_OK;
        }
        if (st == RC_OK) {
            for (unsigned j = 0; j < n; j++) {
                const rnode *o = &rc->urls->node[j];
                if (j == i || (strcmp(o->host, rc->u->host) == 0 &&
                               o->port == rc->u->port) || !says_primary(o))
                    continue;
                snprintf(rc->err, sizeof(rc->err), "two Redis servers say "
                         "they are the primary (%s and %s): waiting for "
                         "one to be demoted", rc->u->text, o->text);
                drop(rc);
                return RC_WAIT;
            }
            atomic_store(&rc->urls->cur, i);
            return RC_OK;
        }
        /* A refusal by the primary (data lost, ...) is final; one by
         * another server (its password: bad configuration) when none is
         * the primary. */
        if (st == RC_FATAL && rc->is_primary)
            return st;
        if (st == RC_FATAL && fatal == 0)
            memcpy(fatal_err, rc->err, sizeof(fatal_err));
        fatal += st == RC_FATAL;
        if (k == 0)
            memcpy(first, rc->err, sizeof(first));
    }
    if (fatal > 0) {
        memcpy(rc->err, fatal_err, sizeof(rc->err));
        return RC_FATAL;
    }
    /* None is the primary yet (a failover in progress): say so. */
    snprintf(rc->err, sizeof(rc->err), "no primary among the %u Redis "
             "servers (%.400s, ...)", n, first);
    return st;
}

static void rc_close(rconn *rc)
{
    if (rc->c)
        redisFree(rc->c);
    rc->c = NULL;
    oq__free(rc->av);
    oq__free(rc->al);
    rc->av = NULL;
    rc->al = NULL;
    rc->avcap = 0;
}

/* After an I/O error or a transient error reply: reconnects with backoff
 * until it works (and the server no longer answers "not now"), the run is
 * stopped, or RECONNECT_GIVE_UP_MS passed. RC_OK, RC_IO or RC_FATAL. */
static int rc_reconnect(rconn *rc)
{
    int64_t t0 = mono_ms();
    uint64_t rng = (uint64_t)t0 ^ (uint64_t)(uintptr_t)rc;

    if (rc->reconnects)
        atomic_fetch_add(rc->reconnects, 1);
    for (uint32_t attempt = 1;; attempt++) {
        int st;
        if (rc->stop && atomic_load(rc->stop)) {
            snprintf(rc->err, sizeof(rc->err), "stopped while reconnecting");
            return RC_IO;
        }
        nap_ms(10 + oq_backoff_ms(50, 2000, attempt, &rng));
        st = rc_open(rc);
        if (st != RC_IO && st != RC_WAIT)
            return st;
        if (mono_ms() - t0 > RECONNECT_GIVE_UP_MS) {
            size_t n = strlen(rc->err);
            snprintf(rc->err + n, sizeof(rc->err) - n, " (gave up after "
                     "%d s of retrying)", RECONNECT_GIVE_UP_MS / 1000);
            return RC_IO;
        }
    }
}

/* rc_reconnect for a call that met "not now" (a transient reply, many
 * redirections): within one limit for the whole call, from its first,
 * so that a call that keeps being refused (a cluster down, a slot stuck
 * half moved) gives up as a lost connection does. 0, or -1 (rc->err). */
static int rc_again(rconn *rc, int64_t *t0)
{
    int64_t now = mono_ms();

    if (*t0 == 0) {
        *t0 = now;
    } else if (now - *t0 > RECONNECT_GIVE_UP_MS) {
        size_t n = strlen(rc->err);
        snprintf(rc->err + n, sizeof(rc->err) - n, " (gave up after %d s "
                 "of retrying)", RECONNECT_GIVE_UP_MS / 1000);
        return -1;
    }
    return rc_reconnect(rc) == RC_OK ? 0 : -1;
}

/* After a reply: a cluster's redirection (redirect) is followed: rc is
 * opened on the node it names, and the caller calls again (after ASKING,
 * *ask, for an ASK). 0 when r is not a redirection (r untouched); 1 when
 * it was (r freed) and rc is ready; -1 when rc could not be opened again
 * (rc->err says why). Many redirections in a row (slots being moved) are
 * followed with the reconnect backoff. */
static int rc_follow(rconn *rc, redisReply *r, bool *ask, unsigned *hops,
                     int64_t *t0)
{
    int how;

    if (r == NULL || (how = redirect(rc, r)) == 0)
        return 0;
    *ask = how == 2;
    if (how == 1)
        atomic_store(&rc->urls->remap, true);
    if (++*hops <= 8 && rc_open(rc) == RC_OK)
        return 1;
    return rc_again(rc, t0) == 0 ? 1 : -1;
}

/* Sends ASKING before a call redirected by ASK. 0, or -1 (connection
 * lost). */
static int rc_asking(rconn *rc, bool *ask)
{
    redisReply *r;

    if (!*ask)
        return 0;
    *ask = false;
    if ((r = redisCommand(rc->c, "ASKING")) == NULL)
        return -1;
    freeReplyObject(r);
    return 0;
}

/* Makes room for n argument pointers. */
static int rc_argv(rconn *rc, size_t n)
{
    if (n <= rc->avcap)
        return 0;
    {
        size_t ncap = rc->avcap ? rc->avcap : 64;
        const char **nav;
        size_t *nal;
        while (ncap < n)
            ncap *= 2;
        nav = oq__realloc(rc->av, ncap * sizeof(*nav));
        if (nav == NULL)
            return -1;
        rc->av = nav;
        nal = oq__realloc(rc->al, ncap * sizeof(*nal));
        if (nal == NULL)
            return -1;
        rc->al = nal;
        rc->avcap = ncap;
    }
    return 0;
}

/* Appends a script call (EVALSHA, or EVAL when eval != 0) to the output
 * buffer: keys and args are abufs (either may be NULL). */
static int rc_append_script(rconn *rc, int script, int eval, const abuf *keys,
                            const abuf *args)
{
    size_t nk = keys ? keys->n : 0, na = args ? args->n : 0, n = 0;
    char nkeys[24];

    if ((keys && keys->oom) || (args && args->oom) ||
        rc_argv(rc, 3 + nk + na) != 0)
        return -1;
    snprintf(nkeys, sizeof(nkeys), "%zu", nk);
    rc->av[n] = eval ? "EVAL" : "EVALSHA";
    rc->al[n++] = strlen(rc->av[0]);
    rc->av[n] = eval ? script_text[script] : rc->sha[script];
    rc->al[n++] = strlen(rc->av[1]);
    rc->av[n] = nkeys;
    rc->al[n++] = strlen(nkeys);
    for (size_t i = 0; i < nk; i++, n++) {
        rc->av[n] = keys->buf + keys->off[i];
        rc->al[n] = keys->alen[i];
    }
    for (size_t i = 0; i < na; i++, n++) {
        rc->av[n] = args->buf + args->off[i];
        rc->al[n] = args->alen[i];
    }
    return redisAppendCommandArgv(rc->c, (int)n, rc->av, rc->al) == REDIS_OK
               ? 0 : -1;
}

/* How rc_call puts one command in rc's output buffer (eval: a script's
 * call is to carry its text, after NOSCRIPT); 0, or -1 when out of
 * memory. */
typedef int rc_issue_fn(rconn *rc, void *arg, int eval);

/*
 * The one loop that runs a command on rc: a redirection is followed
 * (rc_follow), NOSCRIPT is answered by the script's text (the server
 * caches it again), and after an I/O error or a transient error reply
 * (is_transient: the command was refused before it ran, or a script
 * wrote nothing) it reconnects and calls again, within the give-up limits
 * of rc_again and rc_reconnect. Calling again is safe: the scripts are
 * safe to run twice (see DESIGN), and each plain command is one whose
 * repetition is harmless (XGROUP CREATE answers BUSYGROUP, HSET and XDEL
 * are idempotent, an XREADGROUP or XAUTOCLAIM whose reply was lost leaves
 * its entries pending, to be taken over; the rest only read). Returns the
 * reply (possibly an error reply), or NULL: rc->err says why, and the run
 * should stop.
 */
static redisReply *rc_call(rconn *rc, rc_issue_fn *issue, void *arg)
{
    bool ask = false;
    unsigned hops = 0;
    int64_t t0 = 0;

    for (;;) {
        void *reply = NULL;
        int eval = 0, f;
        for (;;) {
            /* No connection: the last open failed (dropped). */
            if (rc->c == NULL || rc_asking(rc, &ask) != 0)
                break;
            if (issue(rc, arg, eval) != 0) {
                snprintf(rc->err, sizeof(rc->err), "out of memory");
                return NULL;
            }
            if (redisGetReply(rc->c, &reply) != REDIS_OK)
                break;
            if ((f = rc_follow(rc, reply, &ask, &hops, &t0)) != 0) {
                if (f < 0)
                    return NULL;
                eval = 0;
                continue;
            }
            if (!eval && is_err(reply, "NOSCRIPT")) {
                freeReplyObject(reply);
                reply = NULL;
                eval = 1;
                continue;
            }
            if (is_transient(reply)) {
                note_transient(rc, reply);
                if (rc_again(rc, &t0) != 0)
                    return NULL;
                continue;
            }
            return reply;
        }
        if (rc_reconnect(rc) != RC_OK)
            return NULL;
    }
}

struct script_call { int script; const abuf *keys, *args; };

static int issue_script(rconn *rc, void *arg, int eval)
{
    struct script_call *a = arg;
    return rc_append_script(rc, a->script, eval, a->keys, a->args);
}

/* Runs a script (rc_call). */
static redisReply *rc_script(rconn *rc, int script, const abuf *keys,
                             const abuf *args)
{
    struct script_call a = { script, keys, args };
    return rc_call(rc, issue_script, &a);
}

struct argv_call { int argc; const char **argv; const size_t *lens; };

static int issue_argv(rconn *rc, void *arg, int eval)
{
    struct argv_call *a = arg;
    (void)eval;
    return redisAppendCommandArgv(rc->c, a->argc, a->argv, a->lens) ==
                   REDIS_OK ? 0 : -1;
}

/* A plain command, argv form (rc_call). */
static redisReply *rc_cmd(rconn *rc, int argc, const char **argv,
                          const size_t *lens)
{
    struct argv_call a = { argc, argv, lens };
    return rc_call(rc, issue_argv, &a);
}

struct fmt_call { const char *fmt; va_list ap; };

static int issue_fmt(rconn *rc, void *arg, int eval)
{
    struct fmt_call *a = arg;
    va_list ap;
    int st;

    (void)eval;
    va_copy(ap, a->ap);
    st = redisvAppendCommand(rc->c, a->fmt, ap);
    va_end(ap);
    return st == REDIS_OK ? 0 : -1;
}

/* A printf-style command, no binary arguments (rc_call). */
static redisReply *rc_cmdf(rconn *rc, const char *fmt, ...)
{
    struct fmt_call a;
    redisReply *r;

    a.fmt = fmt;
    va_start(a.ap, fmt);
    r = rc_call(rc, issue_fmt, &a);
    va_end(a.ap);
    return r;
}

/*
 * --replicas N: waits until N replicas have acknowledged every write this
 * connection made so far (WAIT N timeout_ms), so that what a COMMIT or a
 * SEND batch wrote survives a failover to one of them. Fewer acks is "not
 * yet", like a transient error: WAIT again, with the reconnect backoff,
 * for up to RECONNECT_GIVE_UP_MS, then a failure (rc->err says why). If
 * the connection was replaced meanwhile, the new one has written nothing,
 * and its WAIT would answer at once: it first writes one field into meta
 * (S:meta's "waited"), which the replicas receive after everything the
 * old connection wrote. Replication stays asynchronous: WAIT says the
 * replicas have the writes in memory, not on disk (appendfsync), and a
 * failover may still pick a replica that had not (docs/REDIS.md).
 * 0 or -1.
 */
/* wait_replicas's answer when the primary changed mid-wait. */
#define WAIT_MOVED 1

static int wait_replicas(rconn *rc, const char *meta, int n,
                         int64_t timeout_ms)
{
    int64_t t0 = mono_ms();
    uint64_t rng = (uint64_t)t0 ^ (uint64_t)(uintptr_t)rc;
    unsigned opens = rc->opens, before;
    rnode wrote_to = *rc->u;    /* a copy: on a cluster rc->u is rc->moved,
                                   whichever node a redirection named */
    long long got = 0;

    if (n <= 0)
        return 0;
    for (uint32_t attempt = 1;; attempt++) {
        redisReply *r;
        if (rc->opens != opens && (rc->u->port != wrote_to.port ||
                                   strcmp(rc->u->host, wrote_to.host))) {
            /* The primary changed (a failover) after the writes: whether
             * they reached the new one, no WAIT can tell. */
            snprintf(rc->err, sizeof(rc->err), "the primary changed (%s, "
                     "then %s) while waiting for the replicas",
                     wrote_to.text, rc->u->text);
            return WAIT_MOVED;
        }
        if (rc->opens != opens) {
            r = rc_cmdf(rc, "HSET %s waited 1", meta);
            if (r == NULL)
                return -1;
            freeReplyObject(r);
            opens = rc->opens;
        }
        before = rc->opens;
        r = rc_cmdf(rc, "WAIT %d %" PRId64, n, timeout_ms);
        if (r == NULL)
            return -1;
        if (rc->opens != before) {
            /* The WAIT ran on a new connection (a reconnect, perhaps to
             * another node: WAIT names no key, a cluster would not
             * redirect it): it says nothing of our writes. Judged again
             * above. */
            freeReplyObject(r);
            continue;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            snprintf(rc->err, sizeof(rc->err), "Redis at %s: WAIT: %s",
                     rc->u->text, r->str);
            freeReplyObject(r);
            return -1;
        }
        got = r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
        freeReplyObject(r);
        if (got >= n)
            return 0;
        if ((rc->stop && atomic_load(rc->stop)) ||
            mono_ms() - t0 > RECONNECT_GIVE_UP_MS) {
            snprintf(rc->err, sizeof(rc->err), "Redis at %s: %lld of the "
                     "%d replicas asked for (--replicas) acknowledged the "
                     "writes%s", rc->u->text, got, n,
                     rc->stop && atomic_load(rc->stop)
                         ? " when the run stopped"
                         : " in 60 s of waiting");
            return -1;
        }
        nap_ms(oq_backoff_ms(50, 2000, attempt, &rng));
    }
}

/* First connection of a command: a one-line error and exit status 2 on
 * failure. A server that answers "not now" (loading its data after a
 * restart, busy with a script) is waited for as a reconnect would; one
 * that cannot be reached at all is refused at once. */
static int rc_first(rconn *rc, rurl *u, const char *cmd)
{
    int st;
    rc->urls = u;
    rc->u = &u->node[atomic_load(&u->cur) % u->n];
    st = rc_open(rc);
    if (st == RC_WAIT)
        st = rc_reconnect(rc);
    if (st != RC_OK) {
        fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
        rc_close(rc);
        return 2;
    }
    return 0;
}

/* ============================================================== keys */

typedef struct rkeys {
    char stream[512];
    char counts[540], results[540], dlq[540], delayed[540], stats[540],
        meta[540], idpfx[540], dm[540], rpfx[540], rsrc[540], dd[540];
    size_t idpfx_len, rpfx_len;
} rkeys;

static int make_keys(rkeys *k, const char *stream, const char *cmd)
{
    if (stream == NULL || *stream == '\0' || strlen(stream) >= 500) {
        fprintf(stderr, "onceq %s: --stream NAME is required (at most 499 "
                "bytes)\n", cmd);
        return 2;
    }
    snprintf(k->stream, sizeof(k->stream), "%s", stream);
    snprintf(k->counts, sizeof(k->counts), "%s:counts", stream);
    snprintf(k->results, sizeof(k->results), "%s:results", stream);
    snprintf(k->dlq, sizeof(k->dlq), "%s:dlq", stream);
    snprintf(k->delayed, sizeof(k->delayed), "%s:delayed", stream);
    snprintf(k->stats, sizeof(k->stats), "%s:stats", stream);
    snprintf(k->meta, sizeof(k->meta), "%s:meta", stream);
    snprintf(k->idpfx, sizeof(k->idpfx), "%s:id:", stream);
    snprintf(k->dm, sizeof(k->dm), "%s:d:", stream);
    snprintf(k->dd, sizeof(k->dd), "%s:dd:", stream);
    snprintf(k->rpfx, sizeof(k->rpfx), "%s:rp:", stream);
    snprintf(k->rsrc, sizeof(k->rsrc), "reply:%s", stream);
    k->rpfx_len = strlen(k->rpfx);
    k->idpfx_len = strlen(k->idpfx);
    return 0;
}

/* ========================================================= partitions */

/*
 * --partitions P (docs/REDIS.md, Partitions): stream S is P streams,
 * partition k named {S:k}, each with every key above under that name, so
 * all the keys of a partition share one hash tag and a script touches one
 * Redis Cluster slot. `send` puts an event in partition XXH3-64(id) mod P
 * (a line without an id in 0): every copy of an id meets one claim and one
 * done-mark. Consumers read every partition, and a batch comes from one
 * (rq_receive), so its CLAIM and COMMIT calls each touch one partition. P
 * is fixed at the stream's first use, as S:meta's field "partitions"
 * (S:meta holds nothing else then: each partition has its own meta). A
 * stream first used without --partitions keeps the layout of one
 * partition named S, and refuses --partitions.
 */
typedef struct rpart {
    rkeys k;
    char epoch[64];             /* its epoch (stream_epoch), once known */
} rpart;

typedef struct rparts {
    rkeys base;                 /* S's own keys: base.meta records P */
    rpart *p;                   /* n of them */
    unsigned n;
    bool tagged;                /* named {S:k}; false: one, named S */
} rparts;

/* The partition of an event id. */
static unsigned partition_of(const char *id, size_t len, unsigned n)
{
    return n > 1 ? (unsigned)(XXH3_64bits(id, len) % n) : 0;
}

static void parts_free(rparts *ps)
{
    oq__free(ps->p);
    ps->p = NULL;
    ps->n = 0;
}

/* S:meta's "partitions" into *have (0: none). 0, or an exit status with
 * the message written. */
static int parts_recorded(rconn *rc, const rkeys *base, const char *cmd,
                          unsigned *have)
{
    redisReply *rep = rc_cmdf(rc, "HGET %s partitions", base->meta);
    int st = 0;

    *have = 0;
    if (rep == NULL) {
        fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
        return 2;
    }
    if (rep->type == REDIS_REPLY_STRING)
        *have = (unsigned)strtoul(rep->str, NULL, 10);
    if (rep->type == REDIS_REPLY_ERROR ||
        (rep->type == REDIS_REPLY_STRING &&
         (*have < 1 || *have > OQ__PARTITIONS_MAX))) {
        fprintf(stderr, "onceq %s: Redis at %s: reading the partitions in "
                "%s: %s\n", cmd, rc->u->text, base->meta,
                rep->type == REDIS_REPLY_ERROR ? rep->str : "a bad value");
        st = 2;
    }
    freeReplyObject(rep);
    return st;
}

/* Whether stream S was used without --partitions (its stream or its
 * epoch exists): 1 yes, 0 no, -1 error (message written). */
static int parts_legacy(rconn *rc, const rkeys *base, const char *cmd)
{
    redisReply *a = rc_cmdf(rc, "EXISTS %s", base->stream), *b = NULL;
    int used = -1;

    if (a && a->type == REDIS_REPLY_INTEGER)
        b = rc_cmdf(rc, "HEXISTS %s epoch", base->meta);
    if (b && b->type == REDIS_REPLY_INTEGER)
        used = a->integer > 0 || b->integer > 0;
    else
        fprintf(stderr, "onceq %s: Redis at %s: %s\n", cmd, rc->u->text,
                (b && b->type == REDIS_REPLY_ERROR) ? b->str
                : (a && a->type == REDIS_REPLY_ERROR) ? a->str : rc->err);
    freeReplyObject(a);
    freeReplyObject(b);
    return used;
}

/* A stream without a record of partitions whose partition 0 exists: the
 * record was lost (S:meta deleted), and the unpartitioned layout would
 * put events where no consumer of the partitions reads. 0, or an exit
 * status with the message written. */
static int parts_orphaned(rconn *rc, const char *stream, const char *cmd)
{
    char meta[560];
    redisReply *rep;
    int st = 0;

    if (strpbrk(stream, "{}") != NULL)
        return 0;
    snprintf(meta, sizeof(meta), "{%s:0}:meta", stream);
    rep = rc_cmdf(rc, "EXISTS %s", meta);
    if (rep == NULL || rep->type != REDIS_REPLY_INTEGER) {
        fprintf(stderr, "onceq %s: Redis at %s: %s\n", cmd, rc->u->text,
                rep && rep->str ? rep->str : rc->err);
        st = 2;
    } else if (rep->integer > 0) {
        fprintf(stderr, "onceq %s: stream '%s' has partitions (%s exists) "
                "but %s:meta has lost their number ('partitions'): set it "
                "again with HSET %s:meta partitions P\n", cmd, stream, meta,
                stream, stream);
        st = 2;
    }
    freeReplyObject(rep);
    return st;
}

/*
 * The stream's partitions, into ps: want is --partitions (0: not given),
 * create whether this command may fix them (send, run; not the tools,
 * which only read). 0, or an exit status with the message written.
 */
static int parts_open(rparts *ps, rconn *rc, const char *stream,
                      unsigned want, int create, const char *cmd)
{
    unsigned have;
    int st;

    memset(ps, 0, sizeof(*ps));
    if (make_keys(&ps->base, stream, cmd) != 0)
        return 2;
    if ((st = parts_recorded(rc, &ps->base, cmd, &have)) != 0)
        return st;
    if (have == 0 && want > 0 && create) {
        redisReply *rep;
        if ((st = parts_legacy(rc, &ps->base, cmd)) != 0) {
            if (st > 0)
                fprintf(stderr, "onceq %s: stream '%s' was first used "
                        "without --partitions (one partition, named %s) "
                        "and keeps that layout: leave --partitions out, or "
                        "use a new stream\n", cmd, stream, stream);
            return 2;
        }
        if (strlen(stream) > 490) {
            fprintf(stderr, "onceq %s: a partitioned stream's name is at "
                    "most 490 bytes (its partitions are named {NAME:k})\n",
                    cmd);
            return 2;
        }
        if (strpbrk(stream, "{}") == NULL) {
            rep = rc_cmdf(rc, "HSETNX %s partitions %u", ps->base.meta,
                          want);
            if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
                fprintf(stderr, "onceq %s: Redis at %s: %s\n", cmd,
                        rc->u->text, rep ? rep->str : rc->err);
                freeReplyObject(rep);
                return 2;
            }
            freeReplyObject(rep);
            if ((st = parts_recorded(rc, &ps->base, cmd, &have)) != 0)
                return st;
        }
    }
    if (have > 0 && strpbrk(stream, "{}") != NULL) {
        fprintf(stderr, "onceq %s: a partitioned stream's name may not hold "
                "'{' or '}' (its partitions are named {%s:k}, a Redis hash "
                "tag)\n", cmd, stream);
        return 2;
    }
    if (want > 0 && have == 0) {
        fprintf(stderr, "onceq %s: a partitioned stream's name may not hold "
                "'{' or '}' (its partitions are named {NAME:k}, a Redis "
                "hash tag)\n", cmd);
        return 2;
    }
    if (want > 0 && have != want) {
        fprintf(stderr, "onceq %s: stream '%s' has %u partitions (fixed at "
                "its first use), not %u: give --partitions %u or leave it "
                "out\n", cmd, stream, have, want, have);
        return 2;
    }
    if (have == 0 && (st = parts_orphaned(rc, stream, cmd)) != 0)
        return st;
    if (have == 0 && rc->urls && rc->urls->cluster) {
        if (create)
            fprintf(stderr, "onceq %s: Redis at %s is a Redis Cluster: a "
                    "new stream needs --partitions P (its keys are spread "
                    "over the cluster's slots by partition)\n", cmd,
                    rc->u->text);
        else
            fprintf(stderr, "onceq %s: no stream '%s' on this Redis "
                    "Cluster (a stream there has partitions, recorded in "
                    "%s)\n", cmd, stream, ps->base.meta);
        return 2;
    }
    ps->tagged = have > 0;
    ps->n = have > 0 ? have : 1;
    ps->p = oq__calloc(ps->n, sizeof(*ps->p));
    if (ps->p == NULL) {
        fprintf(stderr, "onceq %s: out of memory\n", cmd);
        return 3;
    }
    if (!ps->tagged) {
        ps->p[0].k = ps->base;
        return 0;
    }
    for (unsigned i = 0; i < ps->n; i++) {
        char name[520];
        snprintf(name, sizeof(name), "{%s:%u}", stream, i);
        if (make_keys(&ps->p[i].k, name, cmd) != 0) {
            parts_free(ps);
            return 2;
        }
    }
    return 0;
}

/* ====================================================== small helpers */

/* The bytes of an id's done-mark field (see DM_LUA): the first 12 of its
 * XXH3-128 digest, big-endian; the first 4 choose its bucket. 96 bits:
 * two of a billion remembered ids share a field with odds of about 1 in
 * 10^11 (a shared field would make the second a duplicate). */
#define MARK_LEN 12

static void mark_of(const char *id, size_t len, char out[MARK_LEN])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(id, len));
    memcpy(out, c.digest, MARK_LEN);
}

static void ab_add_mark(abuf *a, const char *id, size_t len)
{
    char m[MARK_LEN];
    mark_of(id, len, m);
    ab_add(a, m, MARK_LEN);
}

/* A field of a stream entry's [f, v, f, v...] array, or NULL. */
static const redisReply *field(const redisReply *kv, const char *name)
{
    if (kv == NULL || kv->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < kv->elements; i += 2)
        if (kv->element[i]->type == REDIS_REPLY_STRING &&
            strcmp(kv->element[i]->str, name) == 0)
            return kv->element[i + 1];
    return NULL;
}

/* A field's unsigned number, up to max; 0 when absent or not one (an
 * entry added by hand may carry "-5"). */
static uint64_t field_u64(const redisReply *kv, const char *name, uint64_t max)
{
    const redisReply *v = field(kv, name);
    uint64_t u;

    if (v == NULL || v->type != REDIS_REPLY_STRING ||
        oq__parse_count(v->str, 0, max, &u) != 0)
        return 0;
    return u;
}

static uint64_t make_nonce(void)
{
    uint64_t v = 0;
    FILE *f = fopen("/dev/urandom", "rbe");
    if (f) {
        if (fread(&v, sizeof(v), 1, f) != 1)
            v = 0;
        fclose(f);
    }
    if (v == 0) {
        uint64_t s = (uint64_t)wall_ms() ^ ((uint64_t)getpid() << 32);
        v = oq__splitmix64(&s);
    }
    return v;
}

/*
 * Refuses (exit 2) a server whose maxmemory-policy may evict keys: an
 * evicted claim lets a second consumer run an event that is still
 * running, an evicted done-mark (allkeys-*) or an evicted dedup mark lets a
 * processed event run again, silently. CONFIG GET first; where CONFIG is
 * renamed or not allowed (managed services), INFO memory's
 * maxmemory_policy; where neither says, a warning. 0, or an exit status
 * with the message written.
 */
static int check_policy(rconn *rc, const char *cmd)
{
    char policy[64] = "";
    redisReply *rep = rc_cmdf(rc, "CONFIG GET maxmemory-policy");

    if (rep == NULL) {
        fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
        return 2;
    }
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
        rep->element[1]->type == REDIS_REPLY_STRING)
        snprintf(policy, sizeof(policy), "%s", rep->element[1]->str);
    freeReplyObject(rep);
    if (policy[0] == '\0') {
        const char *v;
        if ((rep = rc_cmdf(rc, "INFO memory")) == NULL) {
            fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
            return 2;
        }
        v = rep->type == REDIS_REPLY_STRING
                ? strstr(rep->str, "maxmemory_policy:") : NULL;
        if (v)
            snprintf(policy, sizeof(policy), "%.*s",
                     (int)strcspn(v + 17, "\r\n"), v + 17);
        freeReplyObject(rep);
    }
    if (policy[0] == '\0') {
        fprintf(stderr, "onceq %s: warning: cannot read the maxmemory-policy "
                "of Redis at %s (CONFIG GET and INFO refused); it must be "
                "noeviction, or events may run twice\n", cmd, rc->u->text);
        return 0;
    }
    if (strcmp(policy, "noeviction") != 0) {
        fprintf(stderr, "onceq %s: Redis at %s has maxmemory-policy %s, which "
                "may evict claims and done-marks and run events again; set "
                "maxmemory-policy noeviction\n", cmd, rc->u->text, policy);
        return 2;
    }
    return 0;
}

/* check_policy on every server: on a Redis Cluster, every primary (CLUSTER
 * NODES, each on a connection of its own). A primary that cannot be
 * reached (down, not yet marked failed) is passed over with a warning:
 * its slots answer CLUSTERDOWN, waited out like a restart, until it is
 * back or replaced. */
static int check_policy_all(rconn *rc, rurl *u, const char *cmd)
{
    redisReply *rep;
    int st = check_policy(rc, cmd);

    if (st != 0 || !atomic_load(&u->cluster))
        return st;
    rep = rc_cmdf(rc, "CLUSTER NODES");
    if (rep == NULL || rep->type != REDIS_REPLY_STRING) {
        fprintf(stderr, "onceq %s: Redis at %s: CLUSTER NODES: %s\n", cmd,
                rc->u->text, rep && rep->str ? rep->str : rc->err);
        freeReplyObject(rep);
        return 2;
    }
    /* A line: id host:port@cport[,hostname] flags master-id ... */
    for (const char *line = rep->str; st == 0 && line && *line;) {
        const char *nl = strchr(line, '\n');
        char addr[300], flags[200], *at, *colon;
        rconn n = { .urls = u };
        if (sscanf(line, "%*s %299s %199s", addr, flags) == 2 &&
            strstr(flags, "master") && !strstr(flags, "fail") &&
            (at = strchr(addr, '@')) != NULL) {
            *at = '\0';
            if ((colon = strrchr(addr, ':')) != NULL && colon > addr &&
                (size_t)(colon - addr) < sizeof(n.moved.host)) {
                set_target(&n, addr, (size_t)(colon - addr),
                           atoi(colon + 1));
                int o = rc_open_node(&n);
                if (o == RC_OK)
                    st = check_policy(&n, cmd);
                else if (o == RC_FATAL) {
                    fprintf(stderr, "onceq %s: %s\n", cmd, n.err);
                    st = 2;
                } else {
                    fprintf(stderr, "onceq %s: warning: %s; its "
                            "maxmemory-policy is not checked (it must be "
                            "noeviction)\n", cmd, n.err);
                }
                rc_close(&n);
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    freeReplyObject(rep);
    return st;
}

/*
 * Refuses (exit 2) a stream whose keys exist with another type: most often
 * two streams whose names clash, like "orders" and "orders:counts" (the
 * first one's counts hash is the second one). A script stopped by
 * WRONGTYPE halfway keeps its first writes (Redis does not roll a script
 * back); the scripts check the types they write too, for a clash that
 * appears later. run: 0 for send, which writes only the first three keys
 * below; 1 for run, which writes them all. 0, or an exit status.
 */
static int check_types(rconn *rc, const rkeys *k, const char *cmd, int run)
{
    const struct { const char *key, *type, *what; } want[] = {
        { k->stream, "stream", "the events" },
        { k->stats, "hash", "the stats" },
        { k->meta, "hash", "the settings" },
        { k->counts, "hash", "the counts" },
        { k->results, "stream", "the records" },
        { k->dlq, "stream", "the dead letters" },
        { k->delayed, "zset", "the delayed retries" },
    };
    size_t n = run ? sizeof(want) / sizeof(want[0]) : 3;

    for (size_t i = 0; i < n; i++) {
        redisReply *rep = rc_cmdf(rc, "TYPE %s", want[i].key);
        int ok;
        if (rep == NULL) {
            fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
            return 2;
        }
        ok = rep->type == REDIS_REPLY_STATUS &&
             (strcmp(rep->str, "none") == 0 ||
              strcmp(rep->str, want[i].type) == 0);
        if (!ok)
            fprintf(stderr, "onceq %s: Redis key '%s' is a %s, not the %s of "
                    "%s of stream '%s' (another stream's name clashes with "
                    "this stream's keys: rename one)\n", cmd, want[i].key,
                    rep->type == REDIS_REPLY_STATUS ? rep->str : "?",
                    want[i].type, want[i].what, k->stream);
        freeReplyObject(rep);
        if (!ok)
            return 2;
    }
    return 0;
}

/*
 * The stream's epoch: a random value written into S:meta at its first use
 * (HSETNX: whoever comes first) and read back into out. A connection that
 * knows it checks it at every reconnect (rc_open), and the scripts that
 * could start over (DRAIN, SEND) check it too: its absence, or another
 * value, means the data was lost. 0, or an exit status with the message
 * written.
 */
static int stream_epoch(rconn *rc, const rkeys *k, const char *cmd, char *out,
                        size_t len)
{
    char mine[24];
    redisReply *rep;

    snprintf(mine, sizeof(mine), "%016" PRIx64, make_nonce());
    rep = rc_cmdf(rc, "HSETNX %s epoch %s", k->meta, mine);
    if (rep && rep->type == REDIS_REPLY_INTEGER) {
        freeReplyObject(rep);
        rep = rc_cmdf(rc, "HGET %s epoch", k->meta);
    }
    if (rep == NULL) {
        fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
        return 2;
    }
    if (rep->type != REDIS_REPLY_STRING) {
        fprintf(stderr, "onceq %s: Redis at %s: writing the epoch into %s: "
                "%s\n", cmd, rc->u->text, k->meta,
                rep->type == REDIS_REPLY_ERROR ? rep->str : "bad reply");
        freeReplyObject(rep);
        return 2;
    }
    snprintf(out, len, "%s", rep->str);
    freeReplyObject(rep);
    rc->meta = k->meta;
    rc->stream = k->stream;
    rc->epoch = out;
    return 0;
}

/* A duration as the options take it (1h, 90s, 250ms), for messages. */
static void fmt_duration(int64_t ms, char *out, size_t len)
{
    if (ms > 0 && ms % 3600000 == 0)
        snprintf(out, len, "%" PRId64 "h", ms / 3600000);
    else if (ms > 0 && ms % 60000 == 0)
        snprintf(out, len, "%" PRId64 "m", ms / 60000);
    else if (ms > 0 && ms % 1000 == 0)
        snprintf(out, len, "%" PRId64 "s", ms / 1000);
    else
        snprintf(out, len, "%" PRId64 "ms", ms);
}

/*
 * The stream's retention of done-marks (S:meta's retention, ms; 0:
 * forever), fixed at its first run: the generations of the marks are
 * numbered by it (DM_LUA), so consumers with another one would look for
 * marks where there are none and run processed events again. want: the
 * --retention asked for (0: not given, take the stream's; written as 0 at
 * the first run). When read only (write 0: dlq), a stream without one has
 * 0. 0, or an exit status with the message written.
 */
static int stream_retention(rconn *rc, const rkeys *k, const char *cmd,
                            int64_t want, int write, int64_t *out)
{
    redisReply *rep = NULL;
    char have[24] = "", a[32], b[32];

    if (write)
        rep = rc_cmdf(rc, "HSETNX %s retention %" PRId64, k->meta, want);
    if (!write || (rep && rep->type == REDIS_REPLY_INTEGER)) {
        freeReplyObject(rep);
        rep = rc_cmdf(rc, "HGET %s retention", k->meta);
    }
    if (rep == NULL) {
        fprintf(stderr, "onceq %s: %s\n", cmd, rc->err);
        return 2;
    }
    if (rep->type == REDIS_REPLY_STRING)
        snprintf(have, sizeof(have), "%s", rep->str);
    else if (rep->type != REDIS_REPLY_NIL || write) {
        fprintf(stderr, "onceq %s: Redis at %s: reading the retention in "
                "%s: %s\n", cmd, rc->u->text, k->meta,
                rep->type == REDIS_REPLY_ERROR ? rep->str : "bad reply");
        freeReplyObject(rep);
        return 2;
    }
    freeReplyObject(rep);
    *out = have[0] ? (int64_t)strtoll(have, NULL, 10) : 0;
    if (want > 0 && *out != want) {
        fmt_duration(*out, a, sizeof(a));
        fmt_duration(want, b, sizeof(b));
        if (*out == 0)
            fprintf(stderr, "onceq %s: stream '%s' keeps its done-marks "
                    "forever (fixed at its first run, without --retention); "
                    "--retention %s would lose them: leave it out\n", cmd,
                    k->stream, b);
        else
            fprintf(stderr, "onceq %s: stream '%s' keeps its done-marks for "
                    "%s (--retention, fixed at its first run), not %s: give "
                    "--retention %s or leave it out\n", cmd, k->stream, a, b,
                    a);
        return 2;
    }
    return 0;
}

/* "records", or "counts by "KEY"". */
static void results_kind(char *buf, size_t len, const char *output,
                         const char *key)
{
    if (strcmp(output, "counts") == 0)
        snprintf(buf, len, "counts by \"%.200s\"", key);
    else
        snprintf(buf, len, "%.200s", output);
}

/*
 * What the stream's results are (S:meta's output, count_key, handler),
 * fixed at its first run like the retention: `export` reads them, so a
 * consumer with a handler that writes another kind (records where there
 * are counts, counts of another field) would hide the results, or mix
 * two handlers' counts in one hash: refused (2). A handler with the same
 * kind of results (a new version of an exec: command) is accepted.
 */
static int stream_output(rconn *rc, const rkeys *k, const oq__handler *h,
                         const char *spec)
{
    const char *out = h->output == OQ__OUT_RECORDS ? "records" : "counts";
    const char *key = h->count_key ? h->count_key : "key";
    const char *set[][2] = { { "output", out }, { "count_key", key },
                             { "handler", h->name } };
    redisReply *rep = NULL;
    int st = 2;

    for (size_t i = 0; i < sizeof(set) / sizeof(set[0]); i++) {
        rep = rc_cmdf(rc, "HSETNX %s %s %s", k->meta, set[i][0], set[i][1]);
        if (rep == NULL || rep->type != REDIS_REPLY_INTEGER)
            goto bad;
        freeReplyObject(rep);
    }
    rep = rc_cmdf(rc, "HMGET %s output count_key handler", k->meta);
    if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3)
        goto bad;
    for (size_t i = 0; i < 3; i++)
        if (rep->element[i]->type != REDIS_REPLY_STRING)
            goto bad;
    if (strcmp(rep->element[0]->str, out) != 0 ||
        (strcmp(out, "counts") == 0 && strcmp(rep->element[1]->str, key))) {
        char was[300], now[300];
        results_kind(was, sizeof(was), rep->element[0]->str,
                     rep->element[1]->str);
        results_kind(now, sizeof(now), out, key);
        fprintf(stderr, "onceq run: stream '%s' holds %s (handler '%s', "
                "fixed at its first run); --handler %s writes %s: `onceq "
                "export` would %s them: use another --stream\n", k->stream,
                was, rep->element[2]->str, spec, now,
                strcmp(rep->element[0]->str, out) ? "hide" : "mix");
        freeReplyObject(rep);
        return 2;
    }
    freeReplyObject(rep);
    return 0;
bad:
    fprintf(stderr, "onceq run: Redis at %s: recording the stream's results "
            "in %s: %s\n", rc->u->text, k->meta,
            rep == NULL ? rc->err : rep->type == REDIS_REPLY_ERROR
                                        ? rep->str : "bad reply");
    freeReplyObject(rep);
    return st;
}

/* Marks per done-mark bucket before it is split (DM_LUA): what keeps a
 * bucket, right before its split and with chance's spread, below the
 * server's hash-max-listpack-entries (hash-max-ziplist-entries before 7.0),
 * so that it stays in the compact encoding, and short: a lookup in a
 * listpack reads it from its start, and with 160 marks a bucket (what 512,
 * the default, would allow) claims and commits ran a third slower than
 * with 40, for 3 bytes an id less. So 5/16 of at most 128: 40. Where
 * CONFIG is refused, the same. */
static unsigned dm_load(rconn *rc)
{
    long long entries = 128;
    redisReply *rep = rc_cmdf(rc, "CONFIG GET hash-max-listpack-entries");

    if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 0) {
        freeReplyObject(rep);
        rep = rc_cmdf(rc, "CONFIG GET hash-max-ziplist-entries");
    }
    if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
        rep->element[1]->type == REDIS_REPLY_STRING)
        entries = strtoll(rep->element[1]->str, NULL, 10);
    freeReplyObject(rep);
    return (unsigned)OQ__MAX(1, OQ__MIN(entries, 128) * 5 / 16);
}

/* =============================================================== send */

/*
 * Requests (`send --reply-to R`, `onceq request`; docs/REQUEST-REPLY.md).
 * Each event is stamped with "reply_to":R and a "correlation_id" (its own,
 * else 128 random bits in hex), and its context, {"correlation_id",
 * "stream", "event", "sent_at"}, is stored under R:rq:<correlation id> for
 * whichever requester gets the reply (`run --join-requests`), in the SEND
 * script that sends it.
 */
typedef struct stamper {
    const char *to, *stream;    /* the reply stream; the requests' stream */
    int64_t timeout_ms;         /* --reply-timeout: the deadline's; 0: none */
    char ctxpfx[640];           /* R:rq: */
    uint64_t rng;               /* correlation ids */
    oq__jtape t;
    oq__buf line, corr, ckey, ctx;
    char why[160];              /* stamp_request 0: why not */
} stamper;

static void stamper_init(stamper *st, const char *to, const char *stream,
                         int64_t timeout_ms)
{
    memset(st, 0, sizeof(*st));
    st->to = to;
    st->stream = stream;
    st->timeout_ms = timeout_ms;
    snprintf(st->ctxpfx, sizeof(st->ctxpfx), "%s:rq:", to);
    st->rng = make_nonce();
}

static void stamper_free(stamper *st)
{
    oq__jtape_free(&st->t);
    oq__buf_free(&st->line);
    oq__buf_free(&st->corr);
    oq__buf_free(&st->ckey);
    oq__buf_free(&st->ctx);
}

/* Appends the time now as a JSON string (the one time writer's format). */
static int add_time(oq__buf *b)
{
    char t[64] = "";
    FILE *m = fmemopen(t, sizeof(t) - 1, "w");
    if (m == NULL)
        return OQ_ENOMEM;
    oq__json_write_time(m, wall_ms());
    fclose(m);
    return oq__buf_add(b, t, strlen(t));
}

/* Stamps line[0..len) as a request into st->line, its correlation id's
 * bytes into st->corr, its context's key and value into st->ckey and
 * st->ctx. 1 stamped; 2 stamped with the correlation_id it had, which is
 * not a string (no context: the responders dead-letter it as a bad
 * request); 0 not a JSON object (sent as it is); OQ_ENOMEM. */
static int stamp_request(stamper *st, const char *line, size_t len)
{
    oq__jdoc d;
    uint32_t cv;
    size_t at;
    const char *why;
    bool first = true;
    int rc;

    st->line.len = st->corr.len = st->ckey.len = st->ctx.len = 0;
    if (!oq__utf8_valid(line, len)) {
        snprintf(st->why, sizeof(st->why), "not valid UTF-8 (or a NUL "
                 "byte)");
        return 0;
    }
    if (oq__json_scan(line, len, &st->t, &at, &why) != 0) {
        snprintf(st->why, sizeof(st->why), "not JSON: %s at byte %zu", why,
                 at);
        return 0;
    }
    d = (oq__jdoc){ line, len, st->t.tok, st->t.n };
    cv = oq__jget(&d, 0, "correlation_id", 14);
    if (d.tok[0].type != OQ__J_OBJ) {
        snprintf(st->why, sizeof(st->why), "not a JSON object");
        return 0;
    }
    rc = oq__buf_add(&st->line, "{", 1);
    for (uint32_t i = 1; rc == 0 && i < d.tok[0].end; i = d.tok[i + 1].end) {
        if (oq__jstr_eq(&d, i, "reply_to", 8))
            continue;
        if (!first)
            rc = oq__buf_add(&st->line, ",", 1);
        first = false;
        rc = rc ? rc : oq__jcompact(&d, i, &st->line);
        rc = rc ? rc : oq__buf_add(&st->line, ":", 1);
        rc = rc ? rc : oq__jcompact(&d, i + 1, &st->line);
    }
    if (rc == 0)
        rc = oq__buf_add(&st->line, first ? "\"reply_to\":" : ",\"reply_to\":",
                         first ? 11 : 12);
    rc = rc ? rc : oq__json_quote(&st->line, st->to, strlen(st->to));
    if (cv && d.tok[cv].type != OQ__J_STR) {
        rc = rc ? rc : oq__buf_add(&st->line, "}", 1);
        return rc ? rc : 2;
    }
    if (rc == 0 && cv) {
        rc = oq__buf_reserve(&st->corr, d.tok[cv].len + 1);
        if (rc == 0) {
            size_t n;
            const char *c = oq__jstr(&d, cv, st->corr.data, &n);
            if (c != st->corr.data)
                memcpy(st->corr.data, c, n);
            st->corr.len = n;
        }
    } else if (rc == 0) {
        char hex[40];
        uint64_t a = oq__splitmix64(&st->rng), b = oq__splitmix64(&st->rng);
        snprintf(hex, sizeof(hex), "%016" PRIx64 "%016" PRIx64, a, b);
        rc = oq__buf_add(&st->corr, hex, 32);
        rc = rc ? rc : oq__buf_add(&st->line, ",\"correlation_id\":", 18);
        rc = rc ? rc : oq__json_quote(&st->line, hex, 32);
    }
    rc = rc ? rc : oq__buf_add(&st->line, "}", 1);
    rc = rc ? rc : oq__buf_add(&st->ckey, st->ctxpfx, strlen(st->ctxpfx));
    rc = rc ? rc : oq__buf_add(&st->ckey, st->corr.data, st->corr.len);
    rc = rc ? rc : oq__buf_add(&st->ctx, "{\"correlation_id\":", 18);
    rc = rc ? rc : oq__json_quote(&st->ctx, st->corr.data, st->corr.len);
    rc = rc ? rc : oq__buf_add(&st->ctx, ",\"stream\":", 10);
    rc = rc ? rc : oq__json_quote(&st->ctx, st->stream, strlen(st->stream));
    rc = rc ? rc : oq__buf_add(&st->ctx, ",\"event\":", 9);
    rc = rc ? rc : oq__buf_add(&st->ctx, st->line.data, st->line.len);
    rc = rc ? rc : oq__buf_add(&st->ctx, ",\"sent_at\":", 11);
    rc = rc ? rc : add_time(&st->ctx);
    if (rc == 0 && st->timeout_ms > 0) {
        /* The deadline, unix ms: a reply after it is late (a timeout). */
        char dl[48];
        snprintf(dl, sizeof(dl), ",\"deadline_ms\":%" PRId64,
                 oq__add_ms(wall_ms(), st->timeout_ms));
        rc = oq__buf_add(&st->ctx, dl, strlen(dl));
    }
    rc = rc ? rc : oq__buf_add(&st->ctx, "}", 1);
    return rc ? rc : 1;
}

typedef struct send_batch {
    abuf keys, args;
    size_t nevents;
    int done;           /* its reply came back */
} send_batch;

/* Starts a SEND call's arguments (see the SEND script). */
static void batch_begin(send_batch *b, const rkeys *k, int64_t window_ms,
                        const char *epoch, int64_t request_ttl_ms,
                        bool exclusive, unsigned load)
{
    ab_reset(&b->keys);
    ab_reset(&b->args);
    ab_adds(&b->keys, k->stream);
    ab_adds(&b->keys, k->stats);
    ab_adds(&b->keys, k->meta);
    ab_addi(&b->args, window_ms);
    ab_adds(&b->args, epoch);
    ab_addi(&b->args, request_ttl_ms);
    ab_adds(&b->args, exclusive ? "1" : "0");
    ab_adds(&b->args, k->dd);
    ab_addu(&b->args, load);
    b->nevents = 0;
}

/* Adds one event: mark its id's mark for the dedup window (mark_of;
 * NULL: none), big the full length of a line cut for being too large (0:
 * not cut), req the stamped request's context (NULL: not a request). */
static void batch_add(send_batch *b, const char *mark, const char *line,
                      size_t len, const char *src, uint64_t big,
                      const stamper *req)
{
    ab_add(&b->args, mark ? mark : "", mark ? MARK_LEN : 0);
    ab_add(&b->args, line, len);
    ab_adds(&b->args, src);
    if (big)
        ab_addu(&b->args, big);
    else
        ab_add(&b->args, "", 0);
    ab_add(&b->args, req ? req->ckey.data : "", req ? req->ckey.len : 0);
    ab_add(&b->args, req ? req->ctx.data : "", req ? req->ctx.len : 0);
    b->nevents++;
}

/* An event's source field: file:line, with no newline in it. */
static void line_source(char *src, size_t len, const char *path,
                        uint64_t lineno)
{
    snprintf(src, len, "%s:%" PRIu64, strcmp(path, "-") == 0 ? "<stdin>"
                                                             : path, lineno);
    for (char *p = src; *p; p++)
        if (*p == '\n')
            *p = '?';
}

/* Sends the batches b[0..n) pipelined. A batch whose reply was lost with
 * the connection is sent again after a reconnect (the dedup window makes
 * that safe for events with an id: if the first call ran, they are
 * rejected the second time); a batch refused with NOSCRIPT (SCRIPT FLUSH)
 * is sent again after the scripts are loaded again; one refused with a
 * transient error (is_transient: it did not run) is sent again after a
 * backoff. Adds to *sent and *rej. 0, or an exit status. */
static int send_flush(rconn *rc, send_batch *b, size_t n, int replicas,
                      uint64_t *sent, uint64_t *rej, uint64_t *inuse)
{
    uint64_t s = 0, j = 0, u = 0;

    for (size_t i = 0; i < n; i++)
        b[i].done = 0;
    for (;;) {
        size_t left = 0, got = 0, want = 0;
        int reload = 0, wait = 0;
        if (rc->c == NULL && rc_reconnect(rc) != RC_OK) {
            fprintf(stderr, "onceq send: %s\n", rc->err);
            return 3;
        }
        for (size_t i = 0; i < n; i++) {
            if (b[i].done)
                continue;
            want++;
            if (rc_append_script(rc, SC_SEND, 0, &b[i].keys, &b[i].args)) {
                fprintf(stderr, "onceq send: out of memory\n");
                return 3;
            }
        }
        if (want == 0)
            break;
        for (size_t i = 0; i < n; i++) {
            void *v;
            redisReply *r;
            if (b[i].done)
                continue;
            if (redisGetReply(rc->c, &v) != REDIS_OK)
                break;
            got++;
            r = v;
            if (is_err(r, "NOSCRIPT")) {
                reload = 1;
                left++;
                freeReplyObject(r);
                continue;
            }
            /* A cluster's slot moved: sent again there. One being moved
             * (ASK) is waited out with the reconnect backoff. */
            if (is_err(r, "ASK ")) {
                wait = 1;
                left++;
                note_transient(rc, r);
                continue;
            }
            if (redirect(rc, r) == 1) {
                atomic_store(&rc->urls->remap, true);
                reload = 1;
                left++;
                continue;
            }
            if (is_transient(r)) {
                wait = 1;
                left++;
                note_transient(rc, r);
                continue;
            }
            if (is_err(r, "ONCEQLOST")) {
                char msg[1024];
                lost_message(msg, sizeof(msg), rc->u->text, rc->stream);
                fprintf(stderr, "onceq send: %s\n", msg);
                freeReplyObject(r);
                return 3;
            }
            if (r->type != REDIS_REPLY_ARRAY || r->elements != 3) {
                fprintf(stderr, "onceq send: Redis at %s: %s\n", rc->u->text,
                        r->type == REDIS_REPLY_ERROR ? r->str : "bad reply");
                freeReplyObject(r);
                return 3;
            }
            s += (uint64_t)r->element[0]->integer;
            j += (uint64_t)r->element[1]->integer;
            u += (uint64_t)r->element[2]->integer;
            b[i].done = 1;
            freeReplyObject(r);
        }
        if (got == want && !reload && !wait)
            break;
        if ((got == want && !wait && rc_open(rc) == RC_OK) ||
            rc_reconnect(rc) == RC_OK)
            continue;
        fprintf(stderr, "onceq send: %s\n", rc->err);
        return 3;
    }
    /* --replicas: the batches count as sent once the replicas have them
     * (WAIT: 1 s a try, again with backoff for up to 60 s). After a
     * failover mid-wait, the window is sent again to the new primary:
     * what it already has is refused by the dedup marks (written by the
     * same scripts), and a copy of an event without one is a duplicate
     * its consumers settle. */
    switch (wait_replicas(rc, rc->meta, replicas, 1000)) {
    case 0:
        break;
    case WAIT_MOVED:
        return send_flush(rc, b, n, replicas, sent, rej, inuse);
    default:
        fprintf(stderr, "onceq send: %s\n", rc->err);
        return 3;
    }
    *sent += s;
    *rej += j;
    *inuse += u;
    return 0;
}

/* SEND calls in the making, sent SEND_WINDOW at a time (send and
 * request). */
typedef struct sender {
    send_batch b[SEND_WINDOW];
    size_t nb;                  /* full batches in b */
    rconn own;                  /* its partition's, on a Redis Cluster */
    rconn *rc;                  /* own, or the command's */
    const rkeys *k;
    const oq__send_cfg *c;
    const char *epoch;
    bool exclusive;             /* send: a correlation id in use refuses */
    unsigned load;              /* dedup marks a bucket (dm_load) */
    uint64_t sent, rej, inuse;
} sender;

/* The batch the next event goes into (begun if it is new). */
static send_batch *sender_cur(sender *s)
{
    send_batch *b = &s->b[s->nb];
    if (b->args.n == 0)
        batch_begin(b, s->k, s->c->window_ms, s->epoch,
                    s->c->request_ttl_ms, s->exclusive, s->load);
    return b;
}

/* Sends what is there. 0, or an exit status. */
static int sender_flush(sender *s)
{
    int st = 0;

    if (s->nb < SEND_WINDOW && s->b[s->nb].args.n > 0)
        s->nb++;
    if (s->nb > 0)
        st = send_flush(s->rc, s->b, s->nb, s->c->replicas, &s->sent,
                        &s->rej, &s->inuse);
    for (size_t i = 0; i < s->nb; i++)
        s->b[i].args.n = 0;
    s->nb = 0;
    return st;
}

/* After an event went into sender_cur's batch: a full batch is closed, a
 * full window sent. 0, or an exit status. */
static int sender_added(sender *s)
{
    if (s->b[s->nb].nevents >= s->c->batch)
        s->nb++;
    return s->nb == SEND_WINDOW ? sender_flush(s) : 0;
}

static void sender_free(sender *s)
{
    for (size_t i = 0; i < SEND_WINDOW; i++) {
        ab_free(&s->b[i].keys);
        ab_free(&s->b[i].args);
    }
    rc_close(&s->own);
}

/* One sender per partition of ps (freed with senders_free), on rc (on a
 * Redis Cluster each on a connection of its own, which stays with its
 * partition's master), each partition's key types checked and its epoch
 * known. 0, or an exit status with the message written. */
static int senders_open(sender **out, rparts *ps, rconn *rc, rurl *u,
                        const oq__send_cfg *c, bool exclusive, const char *cmd)
{
    sender *s = oq__calloc(ps->n, sizeof(*s));
    unsigned load = dm_load(rc);
    int st = 0;

    *out = s;
    if (s == NULL) {
        fprintf(stderr, "onceq %s: out of memory\n", cmd);
        return 3;
    }
    for (unsigned p = 0; p < ps->n && st == 0; p++) {
        s[p] = (sender){ .rc = rc, .k = &ps->p[p].k, .c = c,
                         .epoch = ps->p[p].epoch, .exclusive = exclusive,
                         .load = load };
        if (u->cluster) {
            snprintf(s[p].own.name, sizeof(s[p].own.name), "%s", rc->name);
            if (rc_first(&s[p].own, u, cmd) != 0)
                return 2;
            s[p].rc = &s[p].own;
        }
        if ((st = check_types(s[p].rc, &ps->p[p].k, cmd, 0)) == 0)
            st = stream_epoch(s[p].rc, &ps->p[p].k, cmd, ps->p[p].epoch,
                              sizeof(ps->p[p].epoch));
    }
    return st;
}

/* Sends what every sender holds. 0, or an exit status. */
static int senders_flush(sender *s, unsigned n)
{
    int st = 0;

    for (unsigned p = 0; p < n && st == 0; p++)
        st = sender_flush(&s[p]);
    return st;
}

static void senders_free(sender *s, unsigned n)
{
    for (unsigned p = 0; s && p < n; p++)
        sender_free(&s[p]);
    oq__free(s);
}

int oq__redis_send(const oq__send_cfg *c, char **inputs, unsigned ninputs)
{
    static const char *const stdin_only[] = { "-" };
    oq__idspec spec = { c->id_field, strcmp(c->id_field, "id") == 0 };
    uint64_t blank = 0, sent = 0, rej = 0, inuse = 0;
    oq__reader *rd = NULL;
    rconn rc = { 0 };
    rurl u;
    rparts ps = { 0 };
    oq__line l;
    char err[512];
    int status = 0, got, req;
    stamper stp;
    sender *snd = NULL;

    if (c->stream == NULL || *c->stream == '\0')
        return oq__usage_error("send", "--stream NAME is required");
    stamper_init(&stp, c->reply_to, c->stream, c->reply_timeout_given ?
                                                  c->timeout_ms : 0);
    if (parse_url(c->url, c->pwfile, "send", &u, err, sizeof(err)) != 0)
        return oq__usage_error("send", "%s", err);
    if (oq__reader_open(&rd, ninputs ? (const char *const *)inputs
                                     : stdin_only,
                        ninputs ? ninputs : 1, c->max_line, err,
                        sizeof(err)) != 0) {
        fprintf(stderr, "onceq send: %s\n", err);
        return 2;
    }
    if (rc_first(&rc, &u, "send") != 0) {
        oq__reader_close(rd);
        return 2;
    }
    if (c->reply_to && atomic_load(&u.cluster)) {
        fprintf(stderr, "onceq send: Redis at %s is a Redis Cluster: "
                "request-reply (--reply-to) is not supported there (a "
                "reply is written with its request's commit, in another "
                "slot)\n", rc.u->text);
        status = 2;
    }
    if (status != 0 ||
        (status = check_policy_all(&rc, &u, "send")) != 0 ||
        (status = parts_open(&ps, &rc, c->stream, c->partitions, 1,
                             "send")) != 0 ||
        (status = senders_open(&snd, &ps, &rc, &u, c, true, "send")) != 0) {
        senders_free(snd, ps.n);
        parts_free(&ps);
        rc_close(&rc);
        oq__reader_close(rd);
        return status;
    }
    for (;;) {
        got = oq__reader_next(rd, &l, err, sizeof(err));
        if (got < 0) {
            fprintf(stderr, "onceq send: %s\n", err);
            status = 2;
            break;
        }
        if (got > 0 && l.kind == OQ__LINE_BLANK) {
            blank++;
            continue;
        }
        if (got > 0) {
            char src[600];
            const char *path = oq__reader_path(rd, l.file);
            char mark[MARK_LEN];
            bool marked = false;
            unsigned part = 0;
            send_batch *cur;
            req = 0;
            if (c->reply_to && l.kind == OQ__LINE_EVENT &&
                (req = stamp_request(&stp, l.data, l.len)) < 0) {
                fprintf(stderr, "onceq send: out of memory\n");
                status = 3;
                break;
            }
            /* The id: its partition, and its dedup mark. */
            if (l.kind == OQ__LINE_EVENT && (c->window_ms > 0 || ps.n > 1)) {
                oq_event ev = { 0 };
                oq_decoded dec;
                memset(&dec, 0, sizeof(dec));
                ev.payload = l.data;
                ev.payload_len = l.len;
                if (oq__json_decode(&ev, &dec, &spec) == 0) {
                    part = partition_of(dec.id, dec.id_len, ps.n);
                    if (c->window_ms > 0) {
                        mark_of(dec.id, dec.id_len, mark);
                        marked = true;
                    }
                }
                if (dec.parsed)
                    oq__json_free(dec.parsed, &spec);
            }
            cur = sender_cur(&snd[part]);
            line_source(src, sizeof(src), path, l.lineno);
            batch_add(cur, marked ? mark : NULL, req ? stp.line.data : l.data,
                      req ? stp.line.len : l.len, src,
                      l.kind == OQ__LINE_TOO_LARGE ? l.full_len : 0,
                      req == 1 ? &stp : NULL);
            if ((status = sender_added(&snd[part])) != 0)
                break;
            continue;
        }
        status = senders_flush(snd, ps.n);
        break;
    }
    for (unsigned p = 0; p < ps.n; p++) {
        sent += snd[p].sent;
        rej += snd[p].rej;
        inuse += snd[p].inuse;
    }
    if (status == 0 && !c->quiet)
        printf("sent %" PRIu64 ", rejected %" PRIu64 " duplicates\n",
               sent, rej);
    else if (status == 3)
        /* What is in the stream already stays: a send again of the same
         * input puts in only what is not (the dedup window), or its
         * copies are duplicates. */
        fprintf(stderr, "onceq send: stopped after %" PRIu64 " events sent "
                "(and %" PRIu64 " rejected as duplicates)\n", sent, rej);
    if (status == 0 && !c->quiet && blank)
        fprintf(stderr, "onceq send: skipped %" PRIu64 " blank lines\n",
                blank);
    if (status == 0 && inuse) {
        /* Correlation ids are per request: a second request with one in
         * use would take the first one's context, and the requesters
         * (whose id is the correlation id) would handle one reply. */
        fprintf(stderr, "onceq send: refused %" PRIu64 " requests whose "
                "correlation_id is another request's (in %s:rq:*)\n",
                inuse, c->reply_to);
        status = 1;
    }
    senders_free(snd, ps.n);
    parts_free(&ps);
    rc_close(&rc);
    oq__reader_close(rd);
    stamper_free(&stp);
    return status;
}

/* ============================================================ request */

/*
 * `onceq request`: sends each line as a request with its own reply stream
 * (default S:replies:<random>), waits for the replies (XREAD from the
 * stream's end as it was before sending: no group, no older entry), and
 * writes one line per request in input order: the reply, or
 * {"correlation_id","id","status":"timeout"}, or, for a line that cannot
 * be a request, {"correlation_id":null,"status":"rejected","error"}. A
 * reply is matched to its request by correlation id and event id both (two
 * requests may share a correlation id); a line sent twice is two requests,
 * and each gets a reply (the second from the responders' cache). At the
 * end (or on SIGINT/SIGTERM) it deletes the contexts of its requests and,
 * when the reply stream was its own, the stream, marked gone.
 */
typedef struct rq_item {
    UT_hash_handle hh;      /* by key, for the first sent item of a key */
    struct rq_item *same;   /* the next sent item with the same key */
    char *key;              /* item_key (NULL: not sent) */
    size_t key_len, corr_len;
    char *ckey;             /* its context's key */
    size_t ckey_len;
    char *id;               /* the event's id, JSON */
    char *out;              /* the line to write (reply, or rejected) */
    const char *status;     /* ok failed dead timeout rejected */
    unsigned part;          /* its partition */
} rq_item;

/* The signal that stops `onceq request` (0: none); also its connection's
 * stop flag, so that a reconnect loop ends at once. */
static atomic_int req_signal;

static void req_on_signal(int sig)
{
    atomic_store(&req_signal, sig);
}

static char *dup_bytes(const char *p, size_t n)
{
    char *s = oq__malloc(n + 1);
    if (s) {
        if (n)
            memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

/* A rejected line's output. */
static char *rejected_line(const char *why)
{
    oq__buf b = { 0 };
    if (oq__buf_add(&b, "{\"correlation_id\":null,\"status\":\"rejected\","
                    "\"error\":", 51) != 0 ||
        oq__json_quote(&b, why, strlen(why)) != 0 ||
        oq__buf_add(&b, "}", 2) != 0) {
        oq__buf_free(&b);
        return NULL;
    }
    return b.data;
}

/* The matching key of a request: its correlation id's length (8 bytes),
 * the correlation id, the event id (either may hold any byte). */
#define KEY_CORR 8
static char *item_key(const char *corr, size_t cl, const char *id,
                      size_t il, size_t *len)
{
    char *k = oq__malloc(KEY_CORR + cl + il);
    uint64_t n = cl;
    if (k) {
        memcpy(k, &n, KEY_CORR);
        if (cl)
            memcpy(k + KEY_CORR, corr, cl);
        if (il)
            memcpy(k + KEY_CORR + cl, id, il);
        *len = KEY_CORR + cl + il;
    }
    return k;
}

/* Stamps and checks one line into it: 0 sent-to-be (it->key set), 1
 * rejected (it->out set), OQ_ENOMEM. */
static int req_item(rq_item *it, stamper *stp, const oq__line *l,
                    oq__idspec *spec, unsigned np)
{
    char err[320];
    oq_event ev = { 0 };
    oq_decoded dec;
    int st = 0;
    oq__buf q = { 0 };

    memset(&dec, 0, sizeof(dec));
    if (l->kind == OQ__LINE_TOO_LARGE) {
        snprintf(err, sizeof(err), "line of %zu bytes exceeds --max-line",
                 l->full_len);
    } else if ((st = stamp_request(stp, l->data, l->len)) == 0) {
        snprintf(err, sizeof(err), "%s", stp->why);
    } else if (st == 2) {
        snprintf(err, sizeof(err), "correlation_id is not a string");
    } else if (st == 1) {
        /* One the responders would dead-letter for its id (bad_id) would
         * get no reply: refused here, with their reason. */
        ev.payload = stp->line.data;
        ev.payload_len = stp->line.len;
        if (oq__json_decode(&ev, &dec, spec) != 0) {
            snprintf(err, sizeof(err), "%s", dec.error);
            st = 3;
        } else {
            it->part = partition_of(dec.id, dec.id_len, np);
            if (oq__json_quote(&q, dec.id, dec.id_len) != 0 ||
                oq__buf_add(&q, "", 1) != 0 ||
                (it->key = item_key(stp->corr.data, stp->corr.len, dec.id,
                                    dec.id_len, &it->key_len)) == NULL)
                st = OQ_ENOMEM;
        }
        if (dec.parsed)
            oq__json_free(dec.parsed, spec);
    }
    if (st < 0) {
        oq__buf_free(&q);
        return st;
    }
    if (st != 1) {
        it->status = "rejected";
        return (it->out = rejected_line(err)) == NULL ? OQ_ENOMEM : 1;
    }
    it->id = q.data;
    it->corr_len = stp->corr.len;
    it->ckey = dup_bytes(stp->ckey.data, stp->ckey.len);
    it->ckey_len = stp->ckey.len;
    return it->ckey == NULL ? OQ_ENOMEM : 0;
}

/* Reads the inputs and stamps each event into items (grown); sends the
 * stamped ones in batches, and indexes them by key. 0, or an exit
 * status. */
static int req_send(const oq__send_cfg *c, sender *snd, unsigned np,
                    stamper *stp, oq__reader *rd, rq_item **items,
                    size_t *nitems, rq_item **byk)
{
    oq__idspec spec = { c->id_field, strcmp(c->id_field, "id") == 0 };
    size_t cap = 0;
    oq__line l;
    char err[512];
    int status = 0, got;

    for (;;) {
        rq_item *it;
        if (atomic_load(&req_signal)) {
            status = 128 + atomic_load(&req_signal);
            break;
        }
        got = oq__reader_next(rd, &l, err, sizeof(err));
        if (got < 0) {
            fprintf(stderr, "onceq request: %s\n", err);
            status = 2;
            break;
        }
        if (got > 0 && l.kind == OQ__LINE_BLANK)
            continue;
        if (got > 0) {
            char src[600];
            int st;
            if (*nitems == cap) {
                size_t nc = cap ? 2 * cap : 64;
                rq_item *ni = oq__realloc(*items, nc * sizeof(*ni));
                if (ni == NULL)
                    goto nomem;
                *items = ni;
                cap = nc;
            }
            it = &(*items)[(*nitems)++];
            memset(it, 0, sizeof(*it));
            if ((st = req_item(it, stp, &l, &spec, np)) < 0)
                goto nomem;
            if (st > 0)
                continue;
            line_source(src, sizeof(src), oq__reader_path(rd, l.file),
                        l.lineno);
            batch_add(sender_cur(&snd[it->part]), NULL, stp->line.data,
                      stp->line.len, src, 0, stp);
            if ((status = sender_added(&snd[it->part])) != 0)
                break;
            continue;
        }
        status = senders_flush(snd, np);
        break;
    }
    if (status != 0)
        return status;
    for (size_t i = 0; i < *nitems; i++) {
        rq_item *it = &(*items)[i], *first;
        if (it->key == NULL)
            continue;
        HASH_FIND(hh, *byk, it->key, it->key_len, first);
        if (first) {
            while (first->same)
                first = first->same;
            first->same = it;
            continue;
        }
        oq__hash_oom = 0;
        HASH_ADD_KEYPTR(hh, *byk, it->key, it->key_len, it);
        if (oq__hash_oom)
            goto nomem_index;
    }
    return 0;
nomem:
nomem_index:
    fprintf(stderr, "onceq request: out of memory\n");
    return 3;
}

/* The reply stream's last entry id before anything was sent ("0-0" when
 * it does not exist): replies are read after it. 0, or an exit status. */
static int req_start(rconn *rc, const char *rstream, char *last, size_t len)
{
    redisReply *rep = rc_cmdf(rc, "XREVRANGE %s + - COUNT 1", rstream);
    int st = 0;

    snprintf(last, len, "0-0");
    if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "onceq request: Redis at %s: XREVRANGE %s: %s\n",
                rc->u->text, rstream, rep ? rep->str : rc->err);
        st = rep ? 2 : 3;
    } else if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 &&
               rep->element[0]->type == REDIS_REPLY_ARRAY &&
               rep->element[0]->elements >= 1 &&
               rep->element[0]->element[0]->type == REDIS_REPLY_STRING) {
        snprintf(last, len, "%s", rep->element[0]->element[0]->str);
    }
    freeReplyObject(rep);
    return st;
}

/* Gives reply line[0..len) to the first unanswered request of its key.
 * Returns 1 if it answered one, 0 if not ours or a duplicate (*dup set),
 * OQ_ENOMEM. */
static int req_match(rq_item *byk, const char *line, size_t len,
                     oq__jtape *t, bool *dup)
{
    oq__jdoc d;
    uint32_t cv, iv, sv;
    size_t at, cl, il, kl;
    const char *why, *cs, *is;
    char *cb = NULL, *ib = NULL, *key = NULL;
    rq_item *it = NULL;
    int rc = 0;

    *dup = false;
    if (!oq__utf8_valid(line, len) ||
        oq__json_scan(line, len, t, &at, &why) != 0)
        return 0;
    d = (oq__jdoc){ line, len, t->tok, t->n };
    cv = oq__jget(&d, 0, "correlation_id", 14);
    iv = oq__jget(&d, 0, "id", 2);
    sv = oq__jget(&d, 0, "status", 6);
    if (!cv || !iv || !sv || d.tok[cv].type != OQ__J_STR ||
        d.tok[iv].type != OQ__J_STR || d.tok[sv].type != OQ__J_STR)
        return 0; /* not a reply */
    cb = oq__malloc(d.tok[cv].len + 1);
    ib = oq__malloc(d.tok[iv].len + 1);
    if (cb && ib) {
        cs = oq__jstr(&d, cv, cb, &cl);
        is = oq__jstr(&d, iv, ib, &il);
        key = item_key(cs, cl, is, il, &kl);
    }
    if (key == NULL) {
        rc = OQ_ENOMEM;
        goto out;
    }
    HASH_FIND(hh, byk, key, kl, it);
    while (it && it->out)
        it = it->same;
    if (it == NULL) {
        *dup = true; /* ours, all answered; or not ours at all */
        goto out;
    }
    if ((it->out = dup_bytes(line, len)) == NULL) {
        rc = OQ_ENOMEM;
        goto out;
    }
    it->status = oq__jstr_eq(&d, sv, "ok", 2)       ? "ok"
                 : oq__jstr_eq(&d, sv, "failed", 6) ? "failed"
                                                     : "dead";
    rc = 1;
out:
    oq__free(cb);
    oq__free(ib);
    oq__free(key);
    return rc;
}

/* Reads the reply stream after `last` until every sent request has its
 * reply, the time is up, or a signal came. 0, or an exit status. */
static int req_wait(rconn *rc, const char *rstream, char *last,
                    rq_item *byk, size_t waiting, int64_t timeout_ms,
                    uint64_t *dups)
{
    char block[24];
    int64_t end = mono_ms() + timeout_ms;
    oq__jtape t = { 0 };
    int st = 0;

    while (waiting > 0 && !atomic_load(&req_signal)) {
        int64_t left = end - mono_ms();
        const char *av[] = { "XREAD", "COUNT", "1000", "BLOCK", block,
                             "STREAMS", rstream, last };
        redisReply *rep;
        const redisReply *es;
        if (left <= 0)
            break;
        snprintf(block, sizeof(block), "%" PRId64, OQ__MIN(left, 200));
        rep = rc_cmd(rc, 8, av, NULL);
        if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "onceq request: Redis at %s: XREAD %s: %s\n",
                    rc->u->text, rstream, rep ? rep->str : rc->err);
            freeReplyObject(rep);
            st = 3;
            break;
        }
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements == 0 ||
            rep->element[0]->type != REDIS_REPLY_ARRAY ||
            rep->element[0]->elements != 2) {
            freeReplyObject(rep);
            continue; /* nothing new within the block */
        }
        es = rep->element[0]->element[1];
        for (size_t i = 0; i < es->elements && st == 0; i++) {
            const redisReply *e = es->element[i], *line;
            bool dup;
            int m;
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
                e->element[0]->type != REDIS_REPLY_STRING)
                continue;
            snprintf(last, 64, "%s", e->element[0]->str);
            line = field(e->element[1], "e");
            if (line == NULL || line->type != REDIS_REPLY_STRING)
                continue;
            m = req_match(byk, line->str, line->len, &t, &dup);
            if (m < 0) {
                fprintf(stderr, "onceq request: out of memory\n");
                st = 3;
            }
            waiting -= m > 0;
            *dups += dup;
        }
        freeReplyObject(rep);
    }
    oq__jtape_free(&t);
    return st;
}

static size_t req_sent(const rq_item *items, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += items[i].key != NULL;
    return k;
}

/* Deletes the requests' contexts and, when it is ours, the reply stream
 * (and the stats its replies were counted in), leaving R:gone for as long
 * as a request's context would have lived. A few hundred keys a DEL. */
static void req_cleanup(rconn *rc, rq_item *items, size_t n,
                        const char *rstream, bool own, int64_t gone_ms)
{
    const char *av[257];
    size_t lens[257];
    int ac = 0;

    if (own) {
        freeReplyObject(rc_cmdf(rc, "SET %s:gone 1 PX %" PRId64, rstream,
                                gone_ms));
        freeReplyObject(rc_cmdf(rc, "DEL %s %s:stats", rstream, rstream));
    }
    for (size_t i = 0; i <= n; i++) {
        if (i < n && items[i].ckey == NULL)
            continue;
        if (ac == 0) {
            av[ac] = "DEL";
            lens[ac++] = 3;
        }
        if (i < n) {
            av[ac] = items[i].ckey;
            lens[ac++] = items[i].ckey_len;
        }
        if (ac > 1 && (ac == 257 || i == n)) {
            freeReplyObject(rc_cmd(rc, ac, av, lens));
            ac = 0;
        }
    }
}

/* Writes the lines, in input order; 0 every request got "ok", 1 not, 3 a
 * write error. */
static int req_print(rq_item *items, size_t n, uint64_t dups, bool quiet)
{
    static const char *const names[5] = { "ok", "failed", "dead", "timeout",
                                          "rejected" };
    uint64_t by[5] = { 0 };

    for (size_t i = 0; i < n; i++) {
        rq_item *it = &items[i];
        if (it->out) {
            puts(it->out);
        } else {
            fputs("{\"correlation_id\":", stdout);
            oq__json_write_string(stdout, it->key + KEY_CORR, it->corr_len);
            printf(",\"id\":%s,\"status\":\"timeout\"}\n", it->id);
            it->status = "timeout";
        }
        for (int j = 0; j < 5; j++)
            if (strcmp(it->status, names[j]) == 0)
                by[j]++;
    }
    if (!quiet)
        fprintf(stderr, "onceq request: %zu requests: ok %" PRIu64 ", failed "
                "%" PRIu64 ", dead %" PRIu64 ", timeouts %" PRIu64
                ", rejected %" PRIu64 " (duplicate replies %" PRIu64 ")\n",
                n, by[0], by[1], by[2], by[3], by[4], dups);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "onceq request: write error on stdout\n");
        return 3;
    }
    return by[0] == n ? 0 : 1;
}

int oq__redis_request(const oq__send_cfg *c, char **inputs,
                      unsigned ninputs)
{
    static const char *const stdin_only[] = { "-" };
    rq_item *items = NULL, *byk = NULL;
    size_t nitems = 0;
    uint64_t dups = 0;
    oq__reader *rd = NULL;
    rconn rc = { 0 };
    rurl u;
    rparts ps = { 0 };
    sender *snd = NULL;
    stamper stp;
    struct sigaction sa, old_int, old_term;
    char err[512], own[600], last[64];
    const char *rstream, *why;
    int status;

    if (c->stream == NULL || *c->stream == '\0')
        return oq__usage_error("request", "--stream NAME is required");
    snprintf(own, sizeof(own), "%s:replies:%016" PRIx64, c->stream,
             make_nonce());
    rstream = c->reply_stream ? c->reply_stream : own;
    if ((why = oq__reply_to_reserved(rstream, c->stream)) != NULL)
        return oq__usage_error("request", "invalid --reply-stream '%s': it %s",
                           rstream, why);
    if (parse_url(c->url, c->pwfile, "request", &u, err, sizeof(err)) != 0)
        return oq__usage_error("request", "%s", err);
    if (oq__reader_open(&rd, ninputs ? (const char *const *)inputs
                                     : stdin_only,
                        ninputs ? ninputs : 1, c->max_line, err,
                        sizeof(err)) != 0) {
        fprintf(stderr, "onceq request: %s\n", err);
        return 2;
    }
    if (rc_first(&rc, &u, "request") != 0) {
        oq__reader_close(rd);
        return 2;
    }
    /* A signal stops the wait; the contexts and the stream are still
     * cleaned up (status 130 or 143, nothing printed). */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = req_on_signal;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    rc.stop = &req_signal;
    stamper_init(&stp, rstream, c->stream, c->timeout_ms);
    if (u.cluster) {
        fprintf(stderr, "onceq request: Redis at %s is a Redis Cluster: "
                "request-reply is not supported there (a reply is written "
                "with its request's commit, in another slot)\n",
                rc.u->text);
        status = 2;
    } else if ((status = check_policy_all(&rc, &u, "request")) == 0 &&
        (status = parts_open(&ps, &rc, c->stream, c->partitions, 1,
                             "request")) == 0 &&
        (status = senders_open(&snd, &ps, &rc, &u, c, false,
                               "request")) == 0 &&
        (status = req_start(&rc, rstream, last, sizeof(last))) == 0 &&
        (status = req_send(c, snd, ps.n, &stp, rd, &items, &nitems,
                           &byk)) == 0)
        status = req_wait(&rc, rstream, last, byk, req_sent(items, nitems),
                          c->timeout_ms, &dups);
    if (atomic_load(&req_signal))
        status = 128 + atomic_load(&req_signal);
    if (status == 0)
        status = req_print(items, nitems, dups, c->quiet);
    req_cleanup(&rc, items, nitems, rstream, c->reply_stream == NULL,
                c->request_ttl_ms);
    HASH_CLEAR(hh, byk);
    for (size_t i = 0; i < nitems; i++) {
        oq__free(items[i].key);
        oq__free(items[i].ckey);
        oq__free(items[i].id);
        oq__free(items[i].out);
    }
    oq__free(items);
    stamper_free(&stp);
    senders_free(snd, ps.n);
    parts_free(&ps);
    rc_close(&rc);
    oq__reader_close(rd);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    return status;
}

/* =========================================================== consumer */

/* One stream entry, owned by the worker that holds it. */
typedef struct rentry {
    char *eid;            /* stream entry id, "ms-seq" */
    char *line;           /* field e: the event line */
    size_t len;
    char *src;            /* field s: file:line */
    uint32_t prior;       /* field a: attempts before this entry */
    uint32_t deliveries;  /* 1 for a new read; XPENDING's count otherwise */
    int64_t first_ms;     /* field f, or the entry id's time: unix ms */
    uint64_t big;         /* field big: the full length of a cut line */
    int64_t due_ms;       /* held (BUSY): claim again at, monotonic ms */
    int64_t deadline_ms;  /* the delivery's end, monotonic ms (the call
                             that delivered it began at deadline - vt):
                             after it XAUTOCLAIM may hand the entry over,
                             so the claim's lease ends then too */
    /* --join-requests: */
    bool joined;          /* looked up (once per entry in hand) */
    uint8_t late;         /* dead-lettered unrun: LATE_UNKNOWN (no request
                             context), LATE_DEADLINE (after its deadline) */
    char *with_request;   /* the line with its "request", or NULL */
    size_t with_len;
    unsigned part;        /* its partition */
} rentry;

/* What this consumer's COMMIT calls did (the engine counts the rest). */
typedef struct rstats {
    _Atomic uint64_t processed, duplicates, dead, retried, redelivered,
        settled_elsewhere, requests, replies, duplicate_replies,
        late_replies, timeouts;
    _Atomic uint64_t dead_by[OQ_DLQ__COUNT];
} rstats;

typedef struct rrun {
    oq__run_config c;           /* run.c's options (a copy); immutable
                                   after setup, like u, k, h */
    rurl u;
    rparts ps;                  /* the stream's partitions */
    unsigned nconn;             /* connections a thread holds: one per
                                   partition on a cluster, else one */
    bool cluster;               /* on a Redis Cluster */
    /* On a Redis Cluster, each partition's primary (CLUSTER SLOTS, read
     * again after a MOVED), so that a thread keeps one connection per
     * primary (pconn). where and its entries are guarded by map_mu. */
    pthread_mutex_t map_mu;
    struct pnode { char host[256]; int port; } *where;
    _Atomic unsigned map_ver;   /* bumped when where changed */
    oq__handler h;
    oq__idspec idspec;
    char consumer[256];
    uint64_t nonce;             /* makes our fencing tokens unique */
    int64_t retention_ms;       /* the stream's (stream_retention); 0:
                                   done-marks are kept forever */
    char retention[24];         /* the same, as an argument */
    unsigned dm_load;           /* marks per bucket before a split */
    _Atomic int stop;           /* signal, drained, or a fatal error */
    _Atomic int hurry;          /* a signal or a fatal error: a call
                                   waiting (reconnect, WAIT) gives up at
                                   once; a drain lets it finish */
    _Atomic int drained;
    atomic_int reconnects;
    pthread_mutex_t mu;         /* guards reclaimed*, fatal*; a leaf lock */
    rentry **reclaimed;         /* taken over by XAUTOCLAIM, not started */
    size_t nreclaimed, reclaimed_cap;
    char fatal_msg[1024];
    int fatal;
    rstats st;
    int64_t t0_ms;
    _Atomic(oq_pool *) p;       /* the engine, once started */
    _Atomic unsigned nqueues, nledgers;  /* contexts attached so far */
    /* Entries in each worker's hands (its batch and the held ones), for
     * the metrics and the housekeeper; the engine's other contexts hold
     * none. */
    _Atomic uint64_t *inflight;
    _Atomic uint64_t inflight_other;
    /* The group's backlog, for the metrics: refreshed by the housekeeper
     * (XINFO GROUPS: lag; the first undelivered entry's age). */
    _Atomic uint64_t ready;
    _Atomic int64_t oldest_ready_ms;  /* unix ms of its entry id; 0: none */
} rrun;

static void run_fatal(rrun *r, const char *msg)
{
    pthread_mutex_lock(&r->mu);
    if (!r->fatal) {
        r->fatal = 1;
        snprintf(r->fatal_msg, sizeof(r->fatal_msg), "%s", msg);
    }
    pthread_mutex_unlock(&r->mu);
    atomic_store(&r->hurry, 1);
    atomic_store(&r->stop, 1);
}

static void run_fatal_reply(rrun *r, rconn *rc, const redisReply *rep,
                            const char *what)
{
    char msg[1024];
    /* A call abandoned because the run is stopping (drained, a signal) is
     * not an error: what it was doing stays pending in Redis. (A worker's
     * claim or commit is abandoned only on a signal or a fatal error.) */
    if (rep == NULL && atomic_load(rc->stop == &r->hurry ? &r->hurry
                                                         : &r->stop))
        return;
    if (rep == NULL)
        snprintf(msg, sizeof(msg), "%s", rc->err);
    else
        snprintf(msg, sizeof(msg), "Redis at %s: %s: %s", url_text(&r->u), what,
                 rep->type == REDIS_REPLY_ERROR ? rep->str
                                                : "unexpected reply");
    run_fatal(r, msg);
}

#define ADD(field, n) atomic_fetch_add_explicit(&r->st.field, (n), \
                                                memory_order_relaxed)

enum { LATE_UNKNOWN = 1, LATE_DEADLINE };

static void entry_free(rentry *e)
{
    if (e)
        oq__free(e->with_request);
    oq__free(e);
}

/* Copies a stream entry ([id, [field, value, ...]]) out of a reply. */
static rentry *entry_from(const redisReply *e, uint32_t deliveries,
                          int64_t deadline_ms, unsigned part)
{
    const redisReply *kv, *line, *src;
    size_t idl, ll, sl;
    rentry *x;

    if (e == NULL || e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
        e->element[0]->type != REDIS_REPLY_STRING)
        return NULL;
    kv = e->element[1];
    line = field(kv, "e");
    src = field(kv, "s");
    idl = e->element[0]->len;
    ll = line && line->type == REDIS_REPLY_STRING ? line->len : 0;
    sl = src && src->type == REDIS_REPLY_STRING ? src->len : 0;
    x = oq__malloc(sizeof(*x) + idl + ll + sl + 3);
    if (x == NULL)
        return NULL;
    x->eid = (char *)(x + 1);
    memcpy(x->eid, e->element[0]->str, idl + 1);
    x->line = x->eid + idl + 1;
    if (ll)
        memcpy(x->line, line->str, ll);
    x->line[ll] = '\0';
    x->len = ll;
    x->src = x->line + ll + 1;
    if (sl)
        memcpy(x->src, src->str, sl);
    x->src[sl] = '\0';
    x->prior = (uint32_t)field_u64(kv, "a", UINT32_MAX);
    x->deliveries = deliveries;
    x->first_ms = (int64_t)field_u64(kv, "f", INT64_MAX);
    if (x->first_ms == 0)
        x->first_ms = (int64_t)strtoull(x->eid, NULL, 10);
    x->big = field_u64(kv, "big", UINT64_MAX);
    x->due_ms = 0;
    x->deadline_ms = deadline_ms;
    x->joined = false;
    x->late = 0;
    x->with_request = NULL;
    x->with_len = 0;
    x->part = part;
    return x;
}

/* Creates the group at the start of the stream (and the stream) unless it
 * exists. Once the run knows the stream's epoch (a missing group found
 * mid-run), the group is created again only if the epoch is still there:
 * the stream was deleted by hand, and its processed set is intact. If the
 * epoch is gone too, the data was lost (restart without persistence,
 * FLUSHALL): starting over would run events again, or end a --drain with
 * events lost, so the run stops. 0, or -1 with the run's fatal error set. */
static int ensure_group(rrun *r, rconn *rc, unsigned part)
{
    const rpart *pt = &r->ps.p[part];
    const char *av[] = { "XGROUP", "CREATE", pt->k.stream, r->c.group, "0",
                         "MKSTREAM" };
    redisReply *rep;
    int ok;

    if (pt->epoch[0]) {
        rep = rc_cmdf(rc, "HGET %s epoch", pt->k.meta);
        if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
            run_fatal_reply(r, rc, rep, "HGET epoch");
            freeReplyObject(rep);
            return -1;
        }
        ok = rep->type == REDIS_REPLY_STRING &&
             strcmp(rep->str, pt->epoch) == 0;
        freeReplyObject(rep);
        if (!ok) {
            char msg[1024];
            lost_message(msg, sizeof(msg), url_text(&r->u), pt->k.stream);
            run_fatal(r, msg);
            return -1;
        }
    }
    rep = rc_cmd(rc, 6, av, NULL);
    ok = rep && (rep->type == REDIS_REPLY_STATUS ||
                 is_err(rep, "BUSYGROUP"));
    if (!ok)
        run_fatal_reply(r, rc, rep, "XGROUP CREATE");
    freeReplyObject(rep);
    return ok ? 0 : -1;
}

/* One onceq group per stream (docs/REDIS.md): the processed set and the
 * outputs belong to the stream, so a second onceq group would take every
 * event for a duplicate (S:stats no longer balances). The group is fixed
 * in S:meta at the first run; a group of another application on the
 * stream (made with XGROUP CREATE) is its own business. 0, or 2 (a
 * message). */
static int check_group(rconn *rc, const rkeys *k, const char *group)
{
    redisReply *rep = rc_cmdf(rc, "HSETNX %s group %s", k->meta, group);
    int st = 0;

    if (rep != NULL && rep->type == REDIS_REPLY_INTEGER) {
        freeReplyObject(rep);
        rep = rc_cmdf(rc, "HGET %s group", k->meta);
    }
    if (rep == NULL || rep->type != REDIS_REPLY_STRING) {
        fprintf(stderr, "onceq run: Redis at %s: recording the group in %s: "
                "%s\n", rc->u->text, k->meta, rep == NULL ? rc->err
                : rep->type == REDIS_REPLY_ERROR ? rep->str : "bad reply");
        st = 2;
    } else if (strcmp(rep->str, group) != 0) {
        fprintf(stderr, "onceq run: stream '%s' is consumed by group '%s' "
                "(fixed at its first run): one onceq group per stream (a "
                "second one would take every event for a duplicate): give "
                "--group %s\n", k->stream, rep->str, rep->str);
        st = 2;
    }
    freeReplyObject(rep);
    return st;
}

/* A connection of the run: it checks partition part's epoch when it
 * (re)connects. */
static void conn_init(rrun *r, rconn *rc, unsigned part, const char *role)
{
    rc->urls = &r->u;
    rc->u = &r->u.node[atomic_load(&r->u.cur) % r->u.n];
    rc->stop = &r->stop;
    rc->reconnects = &r->reconnects;
    rc->meta = r->ps.p[part].k.meta;
    rc->stream = r->ps.p[part].k.stream;
    rc->epoch = r->ps.p[part].epoch;
    snprintf(rc->name, sizeof(rc->name), "onceq:%s:%s", r->consumer, role);
    for (char *p = rc->name; *p; p++)
        if (*p == ' ')
            *p = '_';
}

/* ------------------------------------------------- the engine's backends */

/*
 * `onceq run --redis` runs the engine (src/engine.c) on two backends:
 *
 *  - the queue backend reads the stream: a worker's receive takes its held
 *    entries that are due (BUSY ones, kept for a few ms), then the
 *    process's reclaimed list (XAUTOCLAIM, in the housekeeper), then new
 *    entries with XREADGROUP ... BLOCK. Reading in each worker needs no
 *    local queue: an entry never waits in our memory while its visibility
 *    clock runs, and back-pressure comes for free. Every entry carries its
 *    delivery deadline (the delivering call's start + vt); a copy past it
 *    is dropped (it is pending, idle, and XAUTOCLAIM delivers it again). A
 *    second copy of one entry in a batch (taken over while a copy waited)
 *    is dropped too. RETURN and NACK keep the entry for later; ACK and
 *    DEAD are the ledger's business.
 *  - the ledger holds the claims and commits: CLAIM and COMMIT scripts,
 *    BEAT for heartbeats. Its commit carries out the queue ops too
 *    (OQ__LEDGER_SETTLES): one COMMIT call per settled range, which marks
 *    ids done, writes outputs, XACKs, dead-letters and schedules retries.
 *    A RETRY of an entry at --max-attempts comes to it as DEAD (the
 *    engine's rule for every backend: reason max_attempts, the handler's
 *    error as the last) and settles the id: one outcome per id. An entry
 *    delivered more than --max-attempts times is a dying delivery: the
 *    engine claims its id and has it dead-lettered.
 *
 * Each context has its own connection, opened on first use (the engine's
 * done context, and the heartbeat thread's queue context, never talk to
 * Redis). A fencing token is the worker (ledger context) and the claim
 * call: the script's token string is "nonce.worker.call:" .. entry.
 */

/* A thread's connections to the partitions: one per partition on a Redis
 * Cluster (each stays with the master that has its partition's slot,
 * following MOVED), one for every partition on a single Redis. */
typedef struct rconns {
    rconn *c;                   /* r->nconn of them, or NULL */
    int *pidx;                  /* cluster: partition -> its connection in
                                   c (-1: not known for map_ver ver) */
    unsigned ver;
} rconns;

typedef struct rqueue {
    rrun *r;
    rconns cs;
    unsigned idx;
    unsigned sweep;             /* the partition to read first next time */
    bool idle;                  /* the last sweep found nothing */
    _Atomic uint64_t *inflight; /* the metrics' and autoclaim's view */
    rentry **batch;             /* the current receive's entries */
    size_t cap;
    rentry **held;              /* RETURN/NACK: receive again at due_ms */
    size_t nheld, heldcap;
    uint64_t receipts;
} rqueue;

/* Opens connection rc for partition part (its meta's epoch checked at
 * every reconnect). false (the run's fatal error set) if it cannot be. */
static bool conn_open(rrun *r, rconn *rc, unsigned part, const char *role,
                      unsigned idx)
{
    char name[48];

    if (r->cluster)
        snprintf(name, sizeof(name), "%s%u.%u", role, idx, part);
    else
        snprintf(name, sizeof(name), "%s%u", role, idx);
    conn_init(r, rc, part, name);
    /* A worker's claims and commits (and their WAIT) are finished even
     * when the run drained meanwhile: only a signal or a fatal error cuts
     * them short. Reads and housekeeping stop with the run. */
    if (strcmp(role, "w") == 0)
        rc->stop = &r->hurry;
    if (r->cluster && r->where) {
        struct pnode at;
        pthread_mutex_lock(&r->map_mu);
        at = r->where[part];
        pthread_mutex_unlock(&r->map_mu);
        if (at.port > 0)
            set_target(rc, at.host, strlen(at.host), at.port);
    }
    if (rc_open(rc) != RC_OK) {
        run_fatal(r, rc->err);
        return false;
    }
    rc->ready = true;
    return true;
}

/* A Redis Cluster's hash slot of the keys whose hash tag is tag: CRC16
 * (XMODEM) of it, mod 16384, as the cluster computes it. */
static unsigned keyslot(const char *tag, size_t len)
{
    uint16_t crc = 0;

    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)((unsigned char)tag[i] << 8);
        for (int j = 0; j < 8; j++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021)
                                 : (uint16_t)(crc << 1);
    }
    return crc & 16383;
}

/* Reads each partition's primary from CLUSTER SLOTS (on rc) into the map;
 * the old map stays when the cluster does not answer. */
static void map_refresh(rrun *r, rconn *rc)
{
    redisReply *rep = rc_cmdf(rc, "CLUSTER SLOTS");

    if (rep == NULL || rep->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(rep);
        return;
    }
    pthread_mutex_lock(&r->map_mu);
    for (unsigned p = 0; p < r->ps.n; p++) {
        char tag[600];
        int n = snprintf(tag, sizeof(tag), "%s:%u", r->ps.base.stream, p);
        long long slot = keyslot(tag, (size_t)n);
        r->where[p].port = 0;
        for (size_t i = 0; i < rep->elements; i++) {
            const redisReply *e = rep->element[i], *m;
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
                e->element[0]->type != REDIS_REPLY_INTEGER ||
                e->element[1]->type != REDIS_REPLY_INTEGER ||
                slot < e->element[0]->integer ||
                slot > e->element[1]->integer)
                continue;
            m = e->element[2];
            if (m->type == REDIS_REPLY_ARRAY && m->elements >= 2 &&
                m->element[0]->type == REDIS_REPLY_STRING &&
                m->element[0]->len > 0 &&
                m->element[0]->len < sizeof(r->where[p].host) &&
                m->element[1]->type == REDIS_REPLY_INTEGER) {
                memcpy(r->where[p].host, m->element[0]->str,
                       m->element[0]->len + 1);
                r->where[p].port = (int)m->element[1]->integer;
            }
            break;
        }
    }
    atomic_fetch_add(&r->map_ver, 1);
    pthread_mutex_unlock(&r->map_mu);
    freeReplyObject(rep);
}

/* Whether rc is connected to primary at. */
static bool conn_at(const rconn *rc, const struct pnode *at)
{
    return rc->ready && rc->u && rc->u->port == at->port &&
           strcmp(rc->u->host, at->host) == 0;
}

/* The connection for partition part, opened on first use; NULL (the
 * run's fatal error set) if it cannot be. On a single Redis, one for
 * every partition. On a Redis Cluster, one per primary: the partition's
 * primary is looked up in the map (map_ver changes it), and a connection
 * already there is shared; a connection follows MOVED wherever the calls
 * send it, and the map is read again after one, so the partitions find
 * their connections again. */
static rconn *pconn(rrun *r, rconns *cs, unsigned part, const char *role,
                    unsigned idx)
{
    unsigned ver;
    struct pnode at;
    int free_i = -1;

    if (cs->c == NULL &&
        (cs->c = oq__calloc(r->nconn, sizeof(*cs->c))) == NULL) {
        run_fatal(r, "out of memory opening a connection");
        return NULL;
    }
    if (!r->cluster) {
        if (cs->c[0].ready || conn_open(r, &cs->c[0], 0, role, idx))
            return &cs->c[0];
        return NULL;
    }
    if (cs->pidx == NULL &&
        (cs->pidx = oq__malloc(r->ps.n * sizeof(*cs->pidx))) == NULL) {
        run_fatal(r, "out of memory opening a connection");
        return NULL;
    }
    /* Loaded first: an exchange on every call would write the shared
     * line from every thread. */
    if (atomic_load_explicit(&r->u.remap, memory_order_relaxed) &&
        atomic_exchange(&r->u.remap, false)) {
        rconn *any = NULL;
        for (unsigned i = 0; i < r->nconn && any == NULL; i++)
            if (cs->c[i].ready)
                any = &cs->c[i];
        if (any)
            map_refresh(r, any);
        else
            atomic_store(&r->u.remap, true); /* for a thread that can */
    }
    ver = atomic_load(&r->map_ver);
    if (cs->ver != ver) {
        for (unsigned i = 0; i < r->ps.n; i++)
            cs->pidx[i] = -1;
        cs->ver = ver;
    }
    if (cs->pidx[part] >= 0 && cs->c[cs->pidx[part]].ready)
        return &cs->c[cs->pidx[part]];
    pthread_mutex_lock(&r->map_mu);
    at = r->where[part];
    pthread_mutex_unlock(&r->map_mu);
    for (unsigned i = 0; i < r->nconn; i++) {
        if (at.port > 0 && conn_at(&cs->c[i], &at)) {
            cs->pidx[part] = (int)i;
            return &cs->c[i];
        }
        if (!cs->c[i].ready && free_i < 0)
            free_i = (int)i;
    }
    /* A connection of its own (at most one per partition: every one in
     * use means the map is not known, or the partitions are all on
     * primaries of their own). */
    if (free_i < 0)
        free_i = (int)part;
    if (!cs->c[free_i].ready && !conn_open(r, &cs->c[free_i], part, role,
                                           idx))
        return NULL;
    cs->pidx[part] = free_i;
    return &cs->c[free_i];
}

static void conns_close(const rrun *r, rconns *cs)
{
    for (unsigned i = 0; cs->c && i < r->nconn; i++)
        rc_close(&cs->c[i]);
    oq__free(cs->c);
    oq__free(cs->pidx);
    cs->c = NULL;
    cs->pidx = NULL;
}

static int rq_attach(void *backend, void **ctx)
{
    rrun *r = backend;
    rqueue *q = oq__calloc(1, sizeof(*q));
    unsigned idx;

    if (q == NULL)
        return OQ_ENOMEM;
    q->r = r;
    idx = atomic_fetch_add(&r->nqueues, 1);
    q->idx = idx;
    q->sweep = idx % r->ps.n;
    q->inflight = idx < r->c.workers ? &r->inflight[idx] : &r->inflight_other;
    q->cap = r->c.batch;
    q->batch = oq__calloc(q->cap, sizeof(*q->batch));
    if (q->batch == NULL) {
        oq__free(q);
        return OQ_ENOMEM;
    }
    *ctx = q;
    return 0;
}

static void rq_detach(void *ctx)
{
    rqueue *q = ctx;

    /* What we hold stays pending in Redis: another consumer (or we, next
     * time) takes it over after the visibility timeout. */
    for (size_t i = 0; i < q->nheld; i++)
        entry_free(q->held[i]);
    atomic_store(q->inflight, 0);
    conns_close(q->r, &q->cs);
    oq__free(q->held);
    oq__free(q->batch);
    oq__free(q);
}

static int hold(rqueue *q, rentry *e)
{
    if (q->nheld == q->heldcap) {
        size_t ncap = q->heldcap ? q->heldcap * 2 : 64;
        rentry **nh = oq__realloc(q->held, ncap * sizeof(*nh));
        if (nh == NULL)
            return -1;
        q->held = nh;
        q->heldcap = ncap;
    }
    q->held[q->nheld++] = e;
    return 0;
}

/* Moves held entries that are due into the batch. A held entry whose
 * delivery is over is dropped: it is pending, idle longer than the
 * visibility timeout, and XAUTOCLAIM delivers it again (to us or to
 * another consumer); keeping the old copy too would put one entry twice
 * in our hands. */
static size_t take_held(rqueue *q, unsigned part, size_t n, size_t want,
                        int64_t now)
{
    size_t keep = 0;
    for (size_t i = 0; i < q->nheld; i++) {
        if (q->held[i]->deadline_ms <= now)
            entry_free(q->held[i]);
        else if (n < want && q->held[i]->due_ms <= now &&
                 q->held[i]->part == part)
            q->batch[n++] = q->held[i];
        else
            q->held[keep++] = q->held[i];
    }
    q->nheld = keep;
    return n;
}

/* Moves entries of partition part from the process's reclaimed list (the
 * newest first) into the batch. */
static size_t take_reclaimed(rqueue *q, unsigned part, size_t n, size_t want,
                             int64_t now)
{
    rrun *r = q->r;
    size_t keep;

    pthread_mutex_lock(&r->mu);
    keep = r->nreclaimed;
    for (size_t i = r->nreclaimed; i-- > 0 && n < want;) {
        rentry *e = r->reclaimed[i];
        if (e->part != part)
            continue;
        if (e->deadline_ms <= now)
            entry_free(e); /* delivered again later, as above */
        else
            q->batch[n++] = e;
        r->reclaimed[i] = NULL;
    }
    for (size_t i = keep = 0; i < r->nreclaimed; i++)
        if (r->reclaimed[i])
            r->reclaimed[keep++] = r->reclaimed[i];
    r->nreclaimed = keep;
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* The partition this receive serves (a batch is of one partition, so its
 * CLAIM and COMMIT calls touch one slot): a due held entry's, else a
 * reclaimed one's, else -1 (read new entries, from q->sweep on). */
static int receive_part(rqueue *q, int64_t now)
{
    rrun *r = q->r;
    int part = -1;

    for (size_t i = 0; i < q->nheld && part < 0; i++)
        if (q->held[i]->due_ms <= now && q->held[i]->deadline_ms > now)
            part = (int)q->held[i]->part;
    if (part >= 0)
        return part;
    pthread_mutex_lock(&r->mu);
    if (r->nreclaimed > 0)
        part = (int)r->reclaimed[r->nreclaimed - 1]->part;
    pthread_mutex_unlock(&r->mu);
    return part;
}

/* XREADGROUP on partition part: appends new entries to the batch. */
static size_t read_new(rqueue *q, unsigned part, size_t n, size_t want,
                       int64_t block_ms)
{
    rrun *r = q->r;
    char count[24], block[24];
    const char *av[12];
    int ac = 0;
    int64_t deadline;
    redisReply *rep;
    rconn *rc = pconn(r, &q->cs, part, "q", q->idx);

    if (rc == NULL)
        return n;
    snprintf(count, sizeof(count), "%zu", want - n);
    snprintf(block, sizeof(block), "%" PRId64, block_ms);
    av[ac++] = "XREADGROUP";
    av[ac++] = "GROUP";
    av[ac++] = r->c.group;
    av[ac++] = r->consumer;
    av[ac++] = "COUNT";
    av[ac++] = count;
    if (block_ms > 0) {
        av[ac++] = "BLOCK";
        av[ac++] = block;
    }
    av[ac++] = "STREAMS";
    av[ac++] = r->ps.p[part].k.stream;
    av[ac++] = ">";
    deadline = mono_ms() + r->c.vt_ms;
    rep = rc_cmd(rc, ac, av, NULL);
    if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
        if (is_err(rep, "NOGROUP"))
            ensure_group(r, rc, part); /* the stream was deleted: again */
        else
            run_fatal_reply(r, rc, rep, "XREADGROUP");
        freeReplyObject(rep);
        return n;
    }
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements > 0 &&
        rep->element[0]->type == REDIS_REPLY_ARRAY &&
        rep->element[0]->elements == 2) {
        const redisReply *es = rep->element[0]->element[1];
        for (size_t i = 0; i < es->elements && n < want; i++) {
            rentry *x = entry_from(es->element[i], 1, deadline, part);
            if (x == NULL) {
                run_fatal(r, "out of memory reading entries");
                break;
            }
            q->batch[n++] = x;
        }
    }
    freeReplyObject(rep);
    return n;
}

/* One copy per entry in a batch: the copy with the latest delivery (a
 * second copy was taken over by XAUTOCLAIM while the first waited). */
static size_t one_copy_per_entry(rqueue *q, size_t n)
{
    size_t m = 0;

    for (size_t i = 0; i < n; i++) {
        rentry *e = q->batch[i];
        size_t j = 0;
        while (j < m && strcmp(q->batch[j]->eid, e->eid) != 0)
            j++;
        if (j == m) {
            q->batch[m++] = e;
            continue;
        }
        if (e->deadline_ms > q->batch[j]->deadline_ms)
            q->batch[j]->deadline_ms = e->deadline_ms;
        q->batch[j]->deliveries = OQ__MAX(q->batch[j]->deliveries,
                                          e->deliveries);
        entry_free(e);
    }
    return m;
}

/*
 * --join-requests: each reply in hand is joined with its request's
 * context (R:rq:<correlation_id>, stored by `send --reply-to`), read with
 * one MGET per receive: its line becomes the reply with one more member,
 * "request". A reply whose context is gone (unknown, or older than
 * --request-ttl) is late: it is delivered dying, so the engine claims its
 * correlation id (a duplicate of a handled reply is acked as one) and
 * dead-letters it without running the handler. A line that is not an
 * object with a string correlation_id is left as it is: the engine
 * dead-letters it (bad_id, parse_error). The stream entry keeps the reply
 * as it came: a retry re-adds that, and it is joined again.
 */
/* Whether a request's context has a deadline_ms (send --reply-timeout)
 * before at_ms: when its reply came (the reply entry's time, first_ms, on
 * Redis's clock; not when a requester gets to it). */
static bool past_deadline(const char *ctx, size_t len, oq__jtape *t,
                          int64_t at_ms)
{
    oq__jdoc d;
    uint32_t v;
    size_t at;
    const char *why;

    /* Most contexts have no deadline: not scanned. */
    if (memmem(ctx, len, "\"deadline_ms\"", 13) == NULL ||
        oq__json_scan(ctx, len, t, &at, &why) != 0)
        return false;
    d = (oq__jdoc){ ctx, len, t->tok, t->n };
    v = oq__jget(&d, 0, "deadline_ms", 11);
    return v && d.tok[v].type == OQ__J_NUM && oq__jnum_is_integer(&d, v) &&
           strtoll(ctx + d.tok[v].start, NULL, 10) < at_ms;
}

static size_t join_requests(rqueue *q, size_t n)
{
    rrun *r = q->r;
    size_t idx[1024], m = 0;
    const char *av[1025];
    size_t lens[1025];
    oq__buf keys = { 0 };
    size_t koff[1024];
    oq__jtape t = { 0 };
    redisReply *rep;
    rconn *rc;

    for (size_t i = 0; i < n && m < 1024; i++) {
        rentry *e = q->batch[i];
        oq__jdoc d;
        uint32_t cv;
        size_t at, len;
        const char *why, *c;
        char *buf;
        if (e->joined)
            continue;
        e->joined = true;
        if (!oq__utf8_valid(e->line, e->len) ||
            oq__json_scan(e->line, e->len, &t, &at, &why) != 0)
            continue;
        d = (oq__jdoc){ e->line, e->len, t.tok, t.n };
        cv = oq__jget(&d, 0, "correlation_id", 14);
        if (cv == 0 || d.tok[cv].type != OQ__J_STR)
            continue;
        koff[m] = keys.len;
        if (oq__buf_add(&keys, r->ps.base.stream,
                        strlen(r->ps.base.stream)) != 0 ||
            oq__buf_add(&keys, ":rq:", 4) != 0 ||
            oq__buf_reserve(&keys, d.tok[cv].len) != 0) {
            e->joined = false;
            break;
        }
        buf = keys.data + keys.len;
        c = oq__jstr(&d, cv, buf, &len);
        if (c != buf)
            memcpy(buf, c, len);
        keys.len += len;
        idx[m++] = i;
    }
    if (m == 0) {
        oq__jtape_free(&t);
        oq__buf_free(&keys);
        return n;
    }
    av[0] = "MGET";
    lens[0] = 4;
    for (size_t j = 0; j < m; j++) {
        av[j + 1] = keys.data + koff[j];
        lens[j + 1] = (j + 1 < m ? koff[j + 1] : keys.len) - koff[j];
    }
    /* --join-requests is refused with partitions: one connection. */
    rc = pconn(r, &q->cs, 0, "q", q->idx);
    rep = rc ? rc_cmd(rc, (int)m + 1, av, lens) : NULL;
    oq__buf_free(&keys);
    if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != m) {
        /* Not looked up: handed to the engine unjoined they would run
         * without their requests, or be taken for late. The run stops;
         * these entries stay pending, for another consumer. */
        size_t k = 0;
        run_fatal_reply(r, rc, rep, "MGET of the requests' contexts");
        freeReplyObject(rep);
        oq__jtape_free(&t);
        for (size_t i = 0, j = 0; i < n; i++) {
            if (j < m && idx[j] == i) {
                entry_free(q->batch[i]);
                j++;
            } else {
                q->batch[k++] = q->batch[i];
            }
        }
        return k;
    }
    for (size_t j = 0; j < m; j++) {
        rentry *e = q->batch[idx[j]];
        const redisReply *v = rep->element[j];
        const char *close;
        size_t head;
        if (v->type != REDIS_REPLY_STRING) {
            e->late = LATE_UNKNOWN;
            continue;
        }
        if (past_deadline(v->str, v->len, &t, e->first_ms)) {
            e->late = LATE_DEADLINE;
            continue;
        }
        /* The reply's closing brace: the last byte but whitespace. */
        close = e->line + e->len;
        while (close > e->line && close[-1] != '}')
            close--;
        head = close > e->line ? (size_t)(close - 1 - e->line) : 0;
        e->with_request = oq__malloc(head + v->len + 16);
        if (e->with_request == NULL) {
            e->late = LATE_UNKNOWN; /* no memory: not joinable */
            continue;
        }
        memcpy(e->with_request, e->line, head);
        e->with_len = head;
        memcpy(e->with_request + e->with_len, ",\"request\":", 11);
        e->with_len += 11;
        memcpy(e->with_request + e->with_len, v->str, v->len);
        e->with_len += v->len;
        e->with_request[e->with_len++] = '}';
        e->with_request[e->with_len] = '\0';
    }
    freeReplyObject(rep);
    oq__jtape_free(&t);
    return n;
}

static int rq_receive(void *ctx, oq_delivery *out, size_t want,
                      int64_t wait_ms)
{
    rqueue *q = ctx;
    rrun *r = q->r;
    int64_t now = mono_ms(), next = INT64_MAX;
    size_t n = 0;
    int part;

    if (atomic_load(&r->stop))
        return OQ_EOF;
    want = OQ__MIN(want, q->cap);
    atomic_store(q->inflight, q->nheld);
    if ((part = receive_part(q, now)) >= 0) {
        n = take_held(q, (unsigned)part, 0, want, now);
        n = take_reclaimed(q, (unsigned)part, n, want, now);
    }
    for (size_t i = 0; i < q->nheld; i++)
        next = OQ__MIN(next, q->held[i]->due_ms);
    /* Read new entries only while few are held: a hung consumer's ids
     * must not make us hold everything. */
    if (n < want && q->nheld < r->c.batch) {
        int64_t block = OQ__MIN(BLOCK_MS, OQ__MAX(wait_ms, 1));
        if (n > 0)
            block = 0;
        else if (q->nheld > 0)
            block = OQ__MAX(1, OQ__MIN(block, next - now));
        if (part >= 0) {
            n = read_new(q, (unsigned)part, n, want, n > 0 ? 0 : block);
        } else {
            /* The partitions in turn from the sweep's, until one has
             * entries; only the last one tried waits for them. After a
             * receive that found nothing, only IDLE_SWEEP are tried (from
             * where it ended): an idle consumer's reads stay few however
             * many partitions there are, and the workers, each from its
             * own place, still see every partition. */
            unsigned np = r->ps.n;
            unsigned tries = q->idle ? OQ__MIN(np, IDLE_SWEEP) : np;
            for (unsigned i = 0;
                 i < tries && n == 0 && !atomic_load(&r->stop); i++) {
                unsigned pt = (q->sweep + i) % np;
                n = read_new(q, pt, n, want, i + 1 == tries ? block : 0);
            }
            q->sweep = (q->sweep + (q->idle ? tries : 1)) % np;
            q->idle = n == 0;
        }
    } else if (n == 0) {
        nap_ms(OQ__MAX(1, OQ__MIN(BUSY_RETRY_MS, next - now)));
    }
    n = one_copy_per_entry(q, n);
    if (r->c.join_requests)
        n = join_requests(q, n);
    for (size_t i = 0; i < n; i++) {
        rentry *e = q->batch[i];
        uint32_t attempts = e->prior + e->deliveries;
        out[i] = (oq_delivery){
            .payload = e->with_request ? e->with_request : e->line,
            .payload_len = e->with_request ? e->with_len : e->len,
            .tag = (uint64_t)(uintptr_t)e,
            .receipt = ++q->receipts,
            .receive_count = attempts,
            .sent_ms = e->first_ms,
            .deadline_ms = e->deadline_ms,
            .dying = attempts > r->c.max_attempts,
            .dying_reason = OQ_DLQ_MAX_ATTEMPTS,
            .msg_ = e,
        };
        if (e->late && !out[i].dying) {
            out[i].dying = 1;
            out[i].dying_reason = OQ_DLQ_REJECTED;
            out[i].last_error =
                e->late == LATE_DEADLINE
                    ? "late reply: it came after its request's deadline "
                      "(send --reply-timeout)"
                    : "late reply: no request with this correlation_id "
                      "(unknown, or its context is older than "
                      "--request-ttl)";
        }
    }
    atomic_store(q->inflight, n + q->nheld);
    return (int)n;
}

static void rq_settle(void *ctx, oq_settle *ops, size_t n)
{
    rqueue *q = ctx;
    int64_t now = mono_ms();

    for (size_t i = 0; i < n; i++) {
        oq_settle *op = &ops[i];
        rentry *e = op->d->msg_;
        op->result = 0;
        switch (op->op) {
        case OQ_SETTLE_EXTEND:
            /* A heartbeat: the ledger's BEAT renewed the delivery. */
            if (e)
                e->deadline_ms = oq__add_ms(now, op->delay_ms);
            break;
        case OQ_SETTLE_RETURN:
        case OQ_SETTLE_NACK:
            /* BUSY, a failed commit, or a stop: claim it again later (if
             * memory is short it is dropped: pending, taken over). */
            if (e && op->release) {
                e->due_ms = oq__add_ms(now, op->delay_ms);
                if (hold(q, e) == 0)
                    op->d->msg_ = e = NULL;
            }
            break;
        case OQ_SETTLE_ACK:
        case OQ_SETTLE_DEAD:
            op->result = OQ_EINVAL; /* the ledger's commit does these */
            break;
        default:
            break;
        }
        if (op->release && e) {
            entry_free(e);
            op->d->msg_ = NULL;
        }
    }
}

static void rq_wake(void *backend)
{
    (void)backend; /* a blocked XREADGROUP returns within BLOCK_MS */
}

const oq__queue_methods oq__redis_queue_methods = {
    .version = 1,
    .name = "redis",
    .attach = rq_attach,
    .detach = rq_detach,
    .receive = rq_receive,
    .settle = rq_settle,
    .wake = rq_wake,
};

/* ----------------------------------------------------------- the ledger */

/* A staged counter delta: key = argument ki of the stage. */
typedef struct scount {
    size_t ki;
    int64_t delta;
} scount;

/* What the COMMIT call does with one entry. */
typedef struct rop {
    char op;              /* C D R F X */
    bool fenced;          /* C: the claim was lost before the commit */
    oq_dlq_reason reason; /* F, X */
    const char *error;    /* F, X */
    size_t c0, c1;        /* C: its counts, cnt[c0..c1) */
    size_t r0, r1;        /* C: its records, args r0..r1 of the stage */
} rop;

typedef struct rledger {
    rrun *r;
    rconns cs;
    unsigned idx;         /* in tokens */
    uint64_t calls;       /* claim calls: in tokens */
    char prefix[64];      /* the token prefix of the entries in hand */
    abuf keys, args;      /* the next script call */
    abuf stage;           /* the handlers' count keys and records */
    abuf rp;              /* the replies: (which to cache head body)* */
    oq__buf head, body;   /* a reply being built */
    scount *cnt, *sorted;
    size_t ncnt, cntcap;
    rop *ops;
    size_t opcap;
    rentry **es;          /* a batch's entries (batch_conn) */
    size_t ecap;
} rledger;

static int grow_entries(rledger *l, size_t n)
{
    rentry **ne = oq__realloc(l->es, n * sizeof(*ne));

    if (ne == NULL) {
        run_fatal(l->r, "out of memory");
        return -1;
    }
    l->es = ne;
    l->ecap = n;
    return 0;
}

static int rl_attach(void *ledger, void **ctx)
{
    rrun *r = ledger;
    rledger *l = oq__calloc(1, sizeof(*l));

    if (l == NULL)
        return OQ_ENOMEM;
    l->r = r;
    l->idx = atomic_fetch_add(&r->nledgers, 1);
    *ctx = l;
    return 0;
}

static void rl_detach(void *ctx)
{
    rledger *l = ctx;

    conns_close(l->r, &l->cs);
    ab_free(&l->keys);
    ab_free(&l->args);
    ab_free(&l->stage);
    ab_free(&l->rp);
    oq__buf_free(&l->head);
    oq__buf_free(&l->body);
    oq__free(l->cnt);
    oq__free(l->sorted);
    oq__free(l->ops);
    oq__free(l->es);
    oq__free(l);
}

/* The token prefix of a claim: its claimer and call (both in the token). */
static void token_prefix(const rrun *r, uint64_t token, char *out,
                         size_t len)
{
    snprintf(out, len, "%016" PRIx64 ".%u.%" PRIx64 ":", r->nonce,
             (unsigned)(token >> 40), (uint64_t)(token & ((1ULL << 40) - 1)));
}

static rentry *entry_of(const oq__lclaim *c)
{
    return c->d->msg_;
}

/* The partition of a batch's entries (rq_receive hands out batches of
 * one), and its connection; NULL (the run's fatal error set) if the
 * connection cannot be opened, or if the batch spans partitions, which
 * would be a bug. */
static rconn *batch_conn(rledger *l, const rentry *const *e, size_t n,
                         const char *role, const rkeys **k)
{
    rrun *r = l->r;
    unsigned part = n > 0 ? e[0]->part : 0;

    for (size_t i = 1; i < n; i++)
        if (e[i]->part != part) {
            run_fatal(r, "internal error: a batch spans partitions");
            return NULL;
        }
    *k = &r->ps.p[part].k;
    return pconn(r, &l->cs, part, role, l->idx);
}

/* Claims the ids with one CLAIM call, each with the rest of its entry's
 * delivery as its lease. */
static int rl_claim(void *ctx, oq__lclaim *c, size_t n)
{
    rledger *l = ctx;
    rrun *r = l->r;
    redisReply *rep;
    uint64_t token = ((uint64_t)l->idx << 40) | (++l->calls &
                                                 ((1ULL << 40) - 1));
    int64_t now = mono_ms();
    const rkeys *k = NULL;
    rconn *rc;

    if (n > l->ecap && grow_entries(l, n) != 0)
        return OQ_ENOMEM;
    for (size_t i = 0; i < n; i++)
        l->es[i] = entry_of(&c[i]);
    if ((rc = batch_conn(l, (const rentry *const *)l->es, n, "w", &k)) ==
        NULL)
        return OQ_EIO;
    token_prefix(r, token, l->prefix, sizeof(l->prefix));
    ab_reset(&l->keys);
    ab_reset(&l->args);
    ab_adds(&l->keys, k->stream);
    ab_adds(&l->args, l->prefix);
    ab_adds(&l->args, r->c.group);
    ab_adds(&l->args, r->consumer);
    ab_adds(&l->args, k->dm);
    ab_adds(&l->args, r->retention);
    for (size_t i = 0; i < n; i++) {
        ab_add2(&l->keys, k->idpfx, k->idpfx_len, c[i].id, c[i].id_len);
        ab_adds(&l->args, entry_of(&c[i])->eid);
        ab_addi(&l->args, OQ__MAX(c[i].d->deadline_ms - now, 1));
        ab_add_mark(&l->args, c[i].id, c[i].id_len);
    }
    if (l->keys.oom || l->args.oom) {
        run_fatal(r, "out of memory building a claim");
        return OQ_ENOMEM;
    }
    rep = rc_script(rc, SC_CLAIM, &l->keys, &l->args);
    if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != n) {
        run_fatal_reply(r, rc, rep, "claim script");
        freeReplyObject(rep);
        return OQ_EIO;
    }
    for (size_t i = 0; i < n; i++) {
        long long v = rep->element[i]->integer;
        c[i].token = token;
        if (v == 0) {
            c[i].status = OQ_CLAIMED;
        } else if (v == -1) {
            c[i].status = OQ_DONE;
        } else if (v > 0) {
            /* BUSY: the script renewed its delivery. */
            c[i].status = OQ_BUSY;
            c[i].holder_deadline_ms = now + v;
            entry_of(&c[i])->deadline_ms = now + r->c.vt_ms;
        } else {
            c[i].status = OQ_BUSY; /* not sent twice: the engine dedups */
            c[i].holder_deadline_ms = now;
        }
    }
    freeReplyObject(rep);
    return 0;
}

static void rl_release(void *ctx, oq__lclaim *c, size_t n)
{
    /* The claim's lease is the delivery's rest: it ends when the entry
     * can be taken over, so there is nothing to give back early. */
    (void)ctx;
    (void)c;
    (void)n;
}

static int rl_extend(void *ctx, const oq__lclaim *c, int64_t deadline_ms)
{
    rledger *l = ctx;
    rrun *r = l->r;
    char token[192];
    redisReply *rep;
    int rc = OQ_ESTALE;
    const rentry *e = entry_of(c);
    const rkeys *k = NULL;
    rconn *conn = batch_conn(l, &e, 1, "beat", &k);

    (void)deadline_ms; /* a whole lease from now, on Redis's clock */
    if (conn == NULL)
        return OQ_EIO;
    token_prefix(r, c->token, token, sizeof(token));
    snprintf(token + strlen(token), sizeof(token) - strlen(token), "%s",
             entry_of(c)->eid);
    ab_reset(&l->keys);
    ab_reset(&l->args);
    ab_adds(&l->keys, k->stream);
    ab_add2(&l->keys, k->idpfx, k->idpfx_len, c->id, c->id_len);
    ab_adds(&l->args, r->c.group);
    ab_adds(&l->args, r->consumer);
    ab_adds(&l->args, token);
    ab_adds(&l->args, entry_of(c)->eid);
    ab_addi(&l->args, r->c.vt_ms);
    if (l->keys.oom || l->args.oom) {
        run_fatal(r, "out of memory in a heartbeat");
        return OQ_ENOMEM;
    }
    rep = rc_script(conn, SC_BEAT, &l->keys, &l->args);
    if (rep && rep->type == REDIS_REPLY_INTEGER)
        rc = rep->integer == 1 ? 0 : OQ_ESTALE;
    else
        run_fatal_reply(r, conn, rep, "heartbeat script");
    freeReplyObject(rep);
    return rc;
}

static void stage_count(const char *key, size_t len, int64_t delta, void *arg)
{
    rledger *l = arg;
    if (l->ncnt == l->cntcap) {
        size_t ncap = l->cntcap ? l->cntcap * 2 : 256;
        scount *nc = oq__realloc(l->cnt, ncap * sizeof(*nc));
        scount *ns;
        if (nc == NULL) {
            l->stage.oom = 1;
            return;
        }
        l->cnt = nc;
        if ((ns = oq__realloc(l->sorted, ncap * sizeof(*ns))) == NULL) {
            l->stage.oom = 1;
            return;
        }
        l->sorted = ns;
        l->cntcap = ncap;
    }
    ab_add(&l->stage, key, len);
    l->cnt[l->ncnt++] = (scount){ l->stage.n - 1, delta };
}

static void stage_record(const void *data, size_t len, void *arg)
{
    rledger *l = arg;
    ab_add(&l->stage, data, len);
}

/* qsort has no context argument: the stage being sorted, per thread. */
static _Thread_local const abuf *tl_stage;

static int by_key(const void *a, const void *b)
{
    const scount *x = a, *y = b;
    const abuf *st = tl_stage;
    size_t lx = st->alen[x->ki], ly = st->alen[y->ki];
    int c = memcmp(st->buf + st->off[x->ki], st->buf + st->off[y->ki],
                   OQ__MIN(lx, ly));
    return c ? c : (lx > ly) - (lx < ly);
}

/* Decides the COMMIT op of each entry and stages the commits' outputs. */
static void plan_ops(rledger *l, const oq__lcommit *e, size_t n)
{
    rrun *r = l->r;

    ab_reset(&l->stage);
    l->ncnt = 0;
    for (size_t i = 0; i < n; i++) {
        rop *o = &l->ops[i];
        const oq_settle *op = e[i].op;
        memset(o, 0, sizeof(*o));
        o->reason = op->reason;
        o->error = op->error ? op->error : "";
        switch (e[i].kind) {
        case OQ__LC_COMMIT:
            o->op = 'C';
            o->c0 = l->ncnt;
            oq_txn_foreach(e[i].txn, NULL, stage_count, l);
            o->c1 = l->ncnt;
            o->r0 = l->stage.n;
            oq_txn_foreach(e[i].txn, stage_record, NULL, l);
            o->r1 = l->stage.n;
            break;
        case OQ__LC_DEAD:
            /* L: a late reply (join_requests), dead and counted so; T:
             * one after its request's deadline, also a timeout. */
            switch (((const rentry *)op->d->msg_)->late) {
            case LATE_UNKNOWN: o->op = 'L'; break;
            case LATE_DEADLINE: o->op = 'T'; break;
            default: o->op = 'F'; break;
            }
            break;
        case OQ__LC_ACK:
            /* E: a duplicate reply (--join-requests), counted so too. */
            o->op = r->c.join_requests ? 'E' : 'D';
            break;
        case OQ__LC_RETRY:
            /* (A RETRY at the last attempt comes as DEAD: the engine's
             * rule, oq__engine_hooks.max_attempts.) */
            o->op = 'R';
            break;
        case OQ__LC_REJECT:
            o->op = 'X';
            break;
        }
    }
}

/* Sums the counter deltas of the commits per key (sort by key, merge runs)
 * into sorted[0..return). */
static size_t sum_counts(rledger *l, size_t n)
{
    size_t ns = 0, out = 0;
    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        if (o->op == 'C' && !o->fenced)
            for (size_t j = o->c0; j < o->c1; j++)
                l->sorted[ns++] = l->cnt[j];
    }
    tl_stage = &l->stage;
    if (ns > 1)
        qsort(l->sorted, ns, sizeof(*l->sorted), by_key);
    for (size_t i = 0; i < ns;) {
        size_t j = i + 1;
        scount sum = l->sorted[i];
        while (j < ns && by_key(&l->sorted[i], &l->sorted[j]) == 0)
            sum.delta += l->sorted[j++].delta;
        l->sorted[out++] = sum;
        i = j;
    }
    return out;
}

/* The tail of an F or X op. */
static void op_dead(rledger *l, const rop *o, const oq__lcommit *e)
{
    const rentry *x = e->op->d->msg_;
    abuf *a = &l->args;
    ab_adds(a, oq_dlq_reason_name(o->reason));
    ab_adds(a, o->error);
    ab_addu(a, e->op->d->receive_count);
    ab_add(a, x->line, x->len);
    ab_adds(a, x->src);
    ab_addi(a, x->first_ms);
}

/* The retry's delayed member: entry, attempts, first seen, source, event. */
static void op_member(rledger *l, const oq__lcommit *e)
{
    const rentry *x = e->op->d->msg_;
    char head[128];
    size_t sl = strlen(x->src);
    /* The attempts so far (a stopped handler's delivery is not one). */
    uint32_t att = e->op->d->receive_count - (e->not_an_attempt &&
                                              e->op->d->receive_count > 0);
    int hl = snprintf(head, sizeof(head), "%s\n%u\n%" PRId64 "\n", x->eid,
                      att, x->first_ms);
    size_t total = (size_t)hl + sl + 1 + x->len;
    char *m = oq__malloc(total);

    if (m == NULL) {
        l->args.oom = 1;
        return;
    }
    memcpy(m, head, (size_t)hl);
    memcpy(m + hl, x->src, sl);
    m[(size_t)hl + sl] = '\n';
    if (x->len)
        memcpy(m + hl + sl + 1, x->line, x->len);
    ab_add(&l->args, m, total);
    oq__free(m);
}

/* The body of op i's reply, into l->body; false when it has none. */
static bool reply_body(rledger *l, const rop *o, const oq__lcommit *e)
{
    const char *b;
    size_t len;

    l->body.len = 0;
    if (e->kind == OQ__LC_RETRY) {
        /* Out of attempts here (plan_ops), not in the engine: dead. */
        if (oq__reply_body(&l->body, OQ__REPLY_DEAD, e->txn, o->error,
                           e->op->d->receive_count) != 0)
            l->rp.oom = 1;
    } else if ((b = oq__txn_reply(e->txn, &len)) != NULL &&
               oq__buf_add(&l->body, b, len) != 0) {
        l->rp.oom = 1;
    }
    /* A stream entry's line has no newline. */
    if (l->body.len && l->body.data[l->body.len - 1] == '\n')
        l->body.len--;
    return l->body.len > 0;
}

/* Stages the replies of the requests among the entries (fenced commits
 * left out) into l->rp; returns how many. */
static size_t stage_replies(rledger *l, const rkeys *pk,
                            const oq__lcommit *e, size_t n)
{
    abuf *a = &l->rp;
    char to[OQ__REPLY_TO_MAX + 1];
    size_t to_len, nrp = 0;
    long long c = 0, other = 0;

    ab_reset(a);
    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        long long which;
        int h;
        if (o->op == 'C' && o->fenced)
            continue;
        which = o->op == 'C' ? ++c : -++other;
        if (o->op != 'C' && o->op != 'F' && o->op != 'D')
            continue;
        if (o->op != 'D' && !reply_body(l, o, &e[i]))
            continue;
        l->head.len = 0;
        h = oq__reply_head(e[i].ev, to, &to_len, &l->head);
        if (h < 0)
            l->rp.oom = 1;
        if (h != 1)
            continue;
        ab_addi(a, which);
        ab_add(a, to, to_len);
        ab_add2(a, pk->rpfx, pk->rpfx_len, e[i].ev->id, e[i].ev->id_len);
        ab_add(a, l->head.data, l->head.len);
        if (o->op == 'D')
            ab_add(a, "", 0);
        else
            ab_add(a, l->body.data, l->body.len);
        nrp++;
    }
    return nrp;
}

/* Builds the COMMIT call (fenced commits left out) on partition pk. */
static void build_commit(rledger *l, const rkeys *pk, const oq__lcommit *e,
                         size_t n)
{
    rrun *r = l->r;
    abuf *k = &l->keys, *a = &l->args, *st = &l->stage;
    size_t nc = 0, nrec = 0, nagg = sum_counts(l, n);
    size_t nrp = stage_replies(l, pk, e, n);

    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        if (o->op == 'C' && !o->fenced) {
            nc++;
            nrec += o->r1 - o->r0;
        }
    }
    ab_reset(k);
    ab_reset(a);
    ab_adds(k, pk->stream);
    ab_adds(k, pk->counts);
    ab_adds(k, pk->results);
    ab_adds(k, pk->dlq);
    ab_adds(k, pk->delayed);
    ab_adds(k, pk->stats);
    ab_adds(a, r->c.group);
    ab_adds(a, l->prefix);
    ab_addu(a, nc);
    ab_addu(a, nagg);
    ab_addu(a, nrec);
    ab_adds(a, pk->dm);
    ab_adds(a, r->retention);
    ab_addu(a, r->dm_load);
    ab_addu(a, nrp);
    ab_addi(a, r->c.reply_ttl_ms);
    ab_adds(a, r->ps.base.rsrc);
    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        if (o->op != 'C' || o->fenced)
            continue;
        ab_add2(k, pk->idpfx, pk->idpfx_len, e[i].ev->id, e[i].ev->id_len);
        ab_adds(a, ((const rentry *)e[i].op->d->msg_)->eid);
    }
    for (size_t i = 0; i < n; i++)
        if (l->ops[i].op == 'C' && !l->ops[i].fenced)
            ab_add_mark(a, e[i].ev->id, e[i].ev->id_len);
    for (size_t i = 0; i < nagg; i++) {
        ab_add(a, st->buf + st->off[l->sorted[i].ki],
               st->alen[l->sorted[i].ki]);
        ab_addi(a, l->sorted[i].delta);
    }
    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        if (o->op != 'C' || o->fenced)
            continue;
        for (size_t j = o->r0; j < o->r1; j++) {
            ab_add(a, e[i].ev->id, e[i].ev->id_len);
            ab_add(a, st->buf + st->off[j], st->alen[j]);
        }
    }
    for (size_t i = 0; i < l->rp.n; i++)
        ab_add(a, l->rp.buf + l->rp.off[i], l->rp.alen[i]);
    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        bool keyed = e[i].claim != NULL && o->op != 'D' && o->op != 'E';
        bool dies = o->op == 'F' || o->op == 'L' || o->op == 'T';
        if (o->op == 'C')
            continue;
        ab_add(a, &o->op, 1);
        ab_adds(a, ((const rentry *)e[i].op->d->msg_)->eid);
        if (keyed) {
            ab_add2(k, pk->idpfx, pk->idpfx_len, e[i].ev->id,
                    e[i].ev->id_len);
            ab_addu(a, k->n);
        } else {
            ab_add(a, "0", 1);
        }
        /* A rejected event's id, when its decode found one. */
        ab_add(a, e[i].ev->id ? e[i].ev->id : "",
               e[i].ev->id ? e[i].ev->id_len : 0);
        if (keyed && dies)
            ab_add_mark(a, e[i].ev->id, e[i].ev->id_len);
        else
            ab_add(a, "", 0);
        if (o->op == 'R') {
            ab_addi(a, e[i].op->delay_ms);
            op_member(l, &e[i]);
        } else if (dies || o->op == 'X') {
            op_dead(l, o, &e[i]);
        }
    }
}

/* The result of each entry from what the COMMIT script did (for the other
 * ops: 1 done, 0 settled by another consumer, -1 fenced), counted in the
 * consumer's stats. */
static void results(rledger *l, oq__lcommit *e, size_t n,
                    const redisReply *res)
{
    rrun *r = l->r;
    size_t j = 0;

    for (size_t i = 0; i < n; i++) {
        const rop *o = &l->ops[i];
        long long v;
        if (o->op == 'C') {
            e[i].result = o->fenced ? OQ_ESTALE : 0;
            if (!o->fenced)
                ADD(processed, 1);
            continue;
        }
        v = j < res->elements ? res->element[j]->integer : 0;
        j++;
        e[i].result = v < 0 ? OQ_ESTALE : 0;
        if (v == 0)
            ADD(settled_elsewhere, 1);
        else if (v < 0)
            ;
        else if (o->op == 'D' || o->op == 'E')
            ADD(duplicates, 1);
        else if (o->op == 'R')
            ADD(retried, 1);
        else {
            ADD(dead, 1);
            ADD(dead_by[o->reason], 1);
            if (o->op == 'L' || o->op == 'T')
                ADD(late_replies, 1);
            if (o->op == 'T')
                ADD(timeouts, 1);
        }
    }
}

/* Commits the entries: one COMMIT call, again without the commits whose
 * claim was lost if there were any. */
static void rl_commit(void *ctx, oq__lcommit *e, size_t n)
{
    rledger *l = ctx;
    rrun *r = l->r;
    const rkeys *pk = NULL;
    rconn *rc;

    for (size_t i = 0; i < n; i++)
        e[i].result = OQ_EIO;
    if (n > l->ecap && grow_entries(l, n) != 0)
        return;
    for (size_t i = 0; i < n; i++)
        l->es[i] = e[i].op->d->msg_;
    if (n > l->opcap) {
        rop *no = oq__realloc(l->ops, n * sizeof(*no));
        if (no == NULL) {
            run_fatal(r, "out of memory building a commit");
            return;
        }
        l->ops = no;
        l->opcap = n;
    }
    if ((rc = batch_conn(l, (const rentry *const *)l->es, n, "w", &pk)) ==
        NULL)
        return;
    /* Every claim of one settled range comes from one claim call. */
    for (size_t i = 0; i < n; i++)
        if (e[i].claim) {
            token_prefix(r, e[i].claim->token, l->prefix, sizeof(l->prefix));
            break;
        }
    plan_ops(l, e, n);
    for (;;) {
        redisReply *rep, *res;
        build_commit(l, pk, e, n);
        if (l->args.oom || l->keys.oom || l->stage.oom || l->rp.oom) {
            run_fatal(r, "out of memory building a commit");
            return;
        }
        rep = rc_script(rc, SC_COMMIT, &l->keys, &l->args);
        if (rep == NULL || rep->type != REDIS_REPLY_ARRAY ||
            rep->elements < 2 ||
            rep->element[0]->type != REDIS_REPLY_INTEGER ||
            rep->element[1]->type != REDIS_REPLY_ARRAY) {
            run_fatal_reply(r, rc, rep, "commit script");
            freeReplyObject(rep);
            return;
        }
        res = rep->element[1];
        if (rep->element[0]->integer < 0) {
            /* Indexes (1-based) among the commits sent. */
            size_t c = 0, f = 0;
            for (size_t i = 0; i < n && f < res->elements; i++) {
                rop *o = &l->ops[i];
                if (o->op != 'C' || o->fenced)
                    continue;
                if ((long long)++c == res->element[f]->integer) {
                    o->fenced = true;
                    f++;
                }
            }
            freeReplyObject(rep);
            continue;
        }
        /* With --replicas, the batch is done (counted, handed back to the
         * engine) only once the replicas have it. */
        switch (wait_replicas(rc, pk->meta, (int)r->c.replicas,
                              OQ__MIN(r->c.vt_ms, 30000))) {
        case 0:
            break;
        case WAIT_MOVED:
            /* A failover mid-wait: the new primary may or may not have
             * the commit. As if fenced: its entries stay pending there and
             * are taken over and claimed again (DONE if it has them) --
             * unless the run is ending (drained): then no one here will
             * take them over, and the drain must not say all is done. */
            if (atomic_load(&r->stop))
                run_fatal(r, "the primary changed while the last commits "
                          "waited for the replicas: run again to settle "
                          "what the new primary lacks");
            for (size_t i = 0; i < n; i++)
                e[i].result = OQ_ESTALE;
            freeReplyObject(rep);
            return;
        default:
            /* Fatal even when the run is stopping: a drain ends when the
             * commits are acknowledged, not when the replicas have them. */
            run_fatal(r, rc->err);
            freeReplyObject(rep);
            return;
        }
        results(l, e, n, res);
        if (rep->elements == 5) {
            ADD(requests, (uint64_t)rep->element[2]->integer);
            ADD(duplicate_replies, (uint64_t)rep->element[3]->integer);
            ADD(replies, (uint64_t)rep->element[4]->integer);
        }
        freeReplyObject(rep);
        return;
    }
}

const oq__ledger_methods oq__redis_ledger_methods = {
    .version = 1,
    .name = "redis",
    .flags = OQ__LEDGER_SETTLES,
    .attach = rl_attach,
    .detach = rl_detach,
    .claim = rl_claim,
    .release = rl_release,
    .extend = rl_extend,
    .commit = rl_commit,
    .set_done = NULL,
};

/* The decode hook: an entry cut for being too large is dead-lettered. */
static int rdecode(const oq_event *ev, oq_decoded *dec, void *arg)
{
    rrun *r = arg;
    const rentry *e = (const rentry *)(uintptr_t)ev->tag;
    unsigned home;
    int st;

    if (e && e->big) {
        dec->reason = OQ_DLQ_TOO_LARGE;
        snprintf(dec->error, sizeof(dec->error), "line of %" PRIu64
                 " bytes exceeds --max-line (first %zu bytes kept)", e->big,
                 e->len);
        return -1;
    }
    if ((st = oq__request_decode(ev, dec, &r->idspec,
                                 r->ps.base.stream)) < 0)
        return -1;
    /* The id's partition is where its claim and done-mark are: one met in
     * another (sent with another --id-field, or added by hand) would be
     * applied once per partition it is found in. */
    if (e && r->ps.n > 1 &&
        (home = partition_of(dec->id, dec->id_len, r->ps.n)) != e->part) {
        dec->reason = OQ_DLQ_REJECTED;
        snprintf(dec->error, sizeof(dec->error), "an id of partition %u in "
                 "partition %u (sent with another --id-field than this "
                 "consumer's?)", home, e->part);
        return -1;
    }
    if (st == 1 && r->cluster) {
        /* Its reply would be written with its commit, in another slot. */
        dec->reason = OQ_DLQ_REJECTED;
        snprintf(dec->error, sizeof(dec->error), "bad request: "
                 "request-reply is not supported on a Redis Cluster");
        return -1;
    }
    return 0;
}

static void rfree(void *parsed, void *arg)
{
    rrun *r = arg;
    oq__json_free(parsed, &r->idspec);
}

/* -------------------------------------------------------- housekeeper */

/*
 * Takes over messages idle longer than the visibility timeout. Their new
 * delivery ends a visibility timeout after the call, so it takes no more
 * than the workers can start in time: what the idle ones finish in a
 * quarter of the visibility timeout (fit_size each), and nothing while
 * every worker is busy (a long handler). A bigger backlog would wait in
 * our memory past its deliveries, be taken over again (each takeover a
 * delivery), and reach --max-attempts without ever running. Returns 1 when
 * there may be more to take now (call again soon), else 0.
 */
static int autoclaim(rrun *r, rconn *rc, unsigned part, char *cursor,
                     size_t curlen)
{
    const char *stream = r->ps.p[part].k.stream;
    char vt[24], count[24];
    oq_pool *eng = atomic_load(&r->p);
    size_t fit = eng ? oq__engine_fit(eng) : 1;
    size_t idle = 0, limit;
    int more = 0;

    for (unsigned i = 0; i < r->c.workers; i++)
        idle += atomic_load_explicit(&r->inflight[i],
                                     memory_order_relaxed) == 0;
    if (idle == 0)
        return 0;
    limit = idle * OQ__MAX(fit, 1);

    limit = OQ__MIN(limit, (size_t)r->c.workers * r->c.batch);
    snprintf(vt, sizeof(vt), "%" PRId64, r->c.vt_ms);
    for (int round = 0; round < 16; round++) {
        const char *av[] = { "XAUTOCLAIM", stream, r->c.group,
                             r->consumer, vt, cursor, "COUNT", count };
        redisReply *rep, *es;
        size_t nes, got = 0;
        rentry **tmp;
        int64_t deadline;

        pthread_mutex_lock(&r->mu);
        nes = r->nreclaimed;
        pthread_mutex_unlock(&r->mu);
        if (nes >= limit)
            return 1;
        snprintf(count, sizeof(count), "%zu",
                 OQ__MIN(limit - nes, (size_t)r->c.batch));
        deadline = mono_ms() + r->c.vt_ms;
        rep = rc_cmd(rc, 8, av, NULL);
        if (rep == NULL || rep->type != REDIS_REPLY_ARRAY ||
            rep->elements < 2 || rep->element[0]->type != REDIS_REPLY_STRING) {
            if (is_err(rep, "NOGROUP"))
                ensure_group(r, rc, part);
            else
                run_fatal_reply(r, rc, rep, "XAUTOCLAIM");
            freeReplyObject(rep);
            return 0;
        }
        snprintf(cursor, curlen, "%s", rep->element[0]->str);
        es = rep->element[1];
        nes = es->elements;
        tmp = oq__calloc(nes ? nes : 1, sizeof(*tmp));
        if (tmp == NULL) {
            freeReplyObject(rep);
            return 0;
        }
        /* Delivery counts, one pipelined XPENDING per entry. */
        for (size_t i = 0; i < nes; i++) {
            const redisReply *e = es->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
                e->element[1]->type != REDIS_REPLY_ARRAY)
                continue;
            /* (Asked only for an entry copied out: each reply read is
             * an asked one's.) */
            if ((tmp[i] = entry_from(e, 1, deadline, part)) == NULL)
                continue;
            redisAppendCommand(rc->c, "XPENDING %s %s %s %s 1", stream,
                               r->c.group, e->element[0]->str,
                               e->element[0]->str);
            got++;
        }
        for (size_t i = 0; i < nes; i++) {
            void *v;
            redisReply *p;
            if (tmp[i] == NULL)
                continue;
            if (redisGetReply(rc->c, &v) != REDIS_OK) {
                /* The entries stay pending; taken over again later. */
                for (size_t k = 0; k < nes; k++)
                    entry_free(tmp[k]);
                oq__free(tmp);
                freeReplyObject(rep);
                rc_reconnect(rc);
                return 0;
            }
            p = v;
            /* Redis was loading or busy: asked again below, once the
             * pipeline is read, so the delivery count (the attempts) is
             * not taken as 1. */
            tmp[i]->deliveries =
                is_transient(p) || is_err(p, "MOVED ") || is_err(p, "ASK ")
                    ? 0 : 1;
            if (p->type == REDIS_REPLY_ARRAY && p->elements == 1 &&
                p->element[0]->type == REDIS_REPLY_ARRAY &&
                p->element[0]->elements == 4)
                tmp[i]->deliveries =
                    (uint32_t)p->element[0]->element[3]->integer;
            freeReplyObject(p);
        }
        for (size_t i = 0; i < nes; i++) {
            redisReply *p;
            if (tmp[i] == NULL || tmp[i]->deliveries != 0)
                continue;
            p = rc_cmdf(rc, "XPENDING %s %s %s %s 1", stream,
                        r->c.group, tmp[i]->eid, tmp[i]->eid);
            tmp[i]->deliveries = 1;
            if (p && p->type == REDIS_REPLY_ARRAY && p->elements == 1 &&
                p->element[0]->type == REDIS_REPLY_ARRAY &&
                p->element[0]->elements == 4)
                tmp[i]->deliveries =
                    (uint32_t)p->element[0]->element[3]->integer;
            freeReplyObject(p);
        }
        pthread_mutex_lock(&r->mu);
        for (size_t i = 0; i < nes; i++) {
            if (tmp[i] == NULL)
                continue;
            if (r->nreclaimed == r->reclaimed_cap) {
                size_t ncap = r->reclaimed_cap ? r->reclaimed_cap * 2 : 256;
                rentry **nr = oq__realloc(r->reclaimed, ncap * sizeof(*nr));
                if (nr == NULL) {
                    entry_free(tmp[i]); /* stays pending in Redis */
                    continue;
                }
                r->reclaimed = nr;
                r->reclaimed_cap = ncap;
            }
            r->reclaimed[r->nreclaimed++] = tmp[i];
        }
        pthread_mutex_unlock(&r->mu);
        ADD(redelivered, got);
        oq__free(tmp);
        freeReplyObject(rep);
        more |= got > 0;
        if (strcmp(cursor, "0-0") == 0 || nes == 0)
            return more;
    }
    return 1;
}

/* 1 when nothing of partition part is pending with any consumer, delayed,
 * or undelivered. */
static int drained(rrun *r, rconn *rc, unsigned part)
{
    const rpart *pt = &r->ps.p[part];
    abuf keys = { 0 }, args = { 0 };
    redisReply *rep;
    int done = 0;

    ab_adds(&keys, pt->k.stream);
    ab_adds(&keys, pt->k.delayed);
    ab_adds(&keys, pt->k.meta);
    ab_adds(&args, r->c.group);
    ab_adds(&args, pt->epoch);
    rep = rc_script(rc, SC_DRAIN, &keys, &args);
    if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 3) {
        done = rep->element[0]->integer == 0 &&
               rep->element[1]->integer == 0 &&
               rep->element[2]->integer == 0;
    } else if (is_err(rep, "ONCEQLOST")) {
        char msg[1024];
        lost_message(msg, sizeof(msg), url_text(&r->u), pt->k.stream);
        run_fatal(r, msg);
    } else if (is_err(rep, "NOGROUP") || is_err(rep, "ERR no such key")) {
        ensure_group(r, rc, part);
    } else {
        run_fatal_reply(r, rc, rep, "drain script");
    }
    freeReplyObject(rep);
    ab_free(&keys);
    ab_free(&args);
    return done;
}

typedef struct house {
    rrun *r;
    rconns cs;
    pthread_t th;
} house;

/* Trims the entries every group has settled (the TRIM script), so an
 * endless stream stays bounded: what is pending or undelivered in any
 * group stays. A failure is the run's (as every script's). */
static void trim(rrun *r, rconn *rc, unsigned part)
{
    abuf keys = { 0 };
    redisReply *rep;

    ab_adds(&keys, r->ps.p[part].k.stream);
    rep = rc_script(rc, SC_TRIM, &keys, NULL);
    if (rep == NULL || (rep->type != REDIS_REPLY_INTEGER &&
                        !is_err(rep, "ERR no such key")))
        run_fatal_reply(r, rc, rep, "trim script");
    freeReplyObject(rep);
    ab_free(&keys);
}

/* For the metrics: the group's backlog, what no consumer of the group has
 * been delivered yet (XINFO GROUPS's lag, Redis 7; 0 when Redis cannot
 * tell), and the unix ms of the first such entry (its id's time). Retries
 * waiting for their backoff in S:delayed are not counted. Errors are
 * ignored: the next call tries again. */
static void backlog(rrun *r, rconn *rc, unsigned part, uint64_t *sum,
                    int64_t *first)
{
    const char *stream = r->ps.p[part].k.stream;
    redisReply *rep = rc_cmdf(rc, "XINFO GROUPS %s", stream);
    const redisReply *lag, *last;
    char from[80];
    uint64_t ready = 0;
    int64_t oldest = 0;

    if (rep == NULL || rep->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(rep);
        return;
    }
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *g = rep->element[i], *name = field(g, "name");
        if (name == NULL || name->type != REDIS_REPLY_STRING ||
            strcmp(name->str, r->c.group) != 0)
            continue;
        lag = field(g, "lag");
        last = field(g, "last-delivered-id");
        if (lag && lag->type == REDIS_REPLY_INTEGER && lag->integer > 0)
            ready = (uint64_t)lag->integer;
        if (ready > 0 && last && last->type == REDIS_REPLY_STRING)
            snprintf(from, sizeof(from), "(%s", last->str);
        else
            ready = 0;
        break;
    }
    freeReplyObject(rep);
    if (ready > 0) {
        rep = rc_cmdf(rc, "XRANGE %s %s + COUNT 1", stream, from);
        if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 &&
            rep->element[0]->type == REDIS_REPLY_ARRAY &&
            rep->element[0]->elements >= 1 &&
            rep->element[0]->element[0]->type == REDIS_REPLY_STRING)
            oldest = (int64_t)strtoull(rep->element[0]->element[0]->str,
                                       NULL, 10);
        freeReplyObject(rep);
    }
    *sum += ready;
    if (oldest > 0 && (*first == 0 || oldest < *first))
        *first = oldest;
}

/* Moves due retries of partition part back into its stream (PROMOTE, 512
 * at a time). 0, or -1 (the run's fatal error set). */
static int promote(rrun *r, rconn *rc, unsigned part)
{
    abuf keys = { 0 }, args = { 0 };
    int st = 0;

    ab_adds(&keys, r->ps.p[part].k.stream);
    ab_adds(&keys, r->ps.p[part].k.delayed);
    ab_addu(&args, 512);
    while (!atomic_load(&r->stop)) {
        redisReply *rep = rc_script(rc, SC_PROMOTE, &keys, &args);
        long long moved;
        if (rep == NULL || rep->type != REDIS_REPLY_INTEGER) {
            run_fatal_reply(r, rc, rep, "promote script");
            freeReplyObject(rep);
            st = -1;
            break;
        }
        moved = rep->integer;
        freeReplyObject(rep);
        if (moved < 512)
            break; /* else more are due */
    }
    ab_free(&keys);
    ab_free(&args);
    return st;
}

/* One partition's housekeeping state. */
typedef struct hpart {
    char cursor[64];            /* XAUTOCLAIM's */
    bool ac_more;               /* more to take over now */
    int64_t last_ac, last_bl, last_trim;
    uint64_t ready;             /* its backlog, as last read */
    int64_t oldest;
} hpart;

/* Partitions a housekeeper tick visits: with many partitions each is
 * visited less often (every HOUSE_TICK_MS x P / HOUSE_PARTS_PER_TICK), so
 * that a consumer's calls to Redis stay bounded. */
#define HOUSE_PARTS_PER_TICK 8

static void *house_main(void *arg)
{
    house *hk = arg;
    rrun *r = hk->r;
    unsigned np = r->ps.n, next = 0, drained_run = 0;
    hpart *hp = oq__calloc(np, sizeof(*hp));
    int64_t ac_every = OQ__MAX(HOUSE_TICK_MS, OQ__MIN(r->c.vt_ms / 4, 1000));
    bool metrics = r->c.metrics_path || r->c.metrics_listen;

    if (hp == NULL) {
        run_fatal(r, "out of memory starting the housekeeper");
        return NULL;
    }
    for (unsigned p = 0; p < np; p++) {
        snprintf(hp[p].cursor, sizeof(hp[p].cursor), "0-0");
        hp[p].last_ac = mono_ms();
    }
    while (!atomic_load(&r->stop)) {
        unsigned visit = OQ__MIN(np, HOUSE_PARTS_PER_TICK);
        uint64_t ready = 0;
        int64_t oldest = 0;

        for (unsigned i = 0; i < visit && !atomic_load(&r->stop); i++) {
            unsigned p = next;
            hpart *h = &hp[p];
            int64_t now = mono_ms();
            rconn *rc = pconn(r, &hk->cs, p, "house", 0);
            next = (next + 1) % np;
            if (rc == NULL || promote(r, rc, p) != 0)
                goto out;
            /* A backlog being taken over is taken as the workers catch
             * up. */
            if (h->ac_more || now - h->last_ac >= ac_every) {
                h->ac_more = autoclaim(r, rc, p, h->cursor,
                                       sizeof(h->cursor));
                h->last_ac = now;
            }
            if (metrics && now - h->last_bl >= 1000) {
                h->ready = 0;
                h->oldest = 0;
                backlog(r, rc, p, &h->ready, &h->oldest);
                h->last_bl = now;
            }
            if (now - h->last_trim >= TRIM_EVERY_MS) {
                trim(r, rc, p);
                h->last_trim = now;
            }
            /* Drained when every partition was found drained, one after
             * the other: a drained partition stays so (its work moves only
             * within it) unless events are sent. */
            if (r->c.drain)
                drained_run = drained(r, rc, p) ? drained_run + 1 : 0;
        }
        for (unsigned p = 0; metrics && p < np; p++) {
            ready += hp[p].ready;
            if (hp[p].oldest > 0 && (oldest == 0 || hp[p].oldest < oldest))
                oldest = hp[p].oldest;
        }
        atomic_store(&r->ready, ready);
        atomic_store(&r->oldest_ready_ms, oldest);
        if (r->c.drain && drained_run >= np && !atomic_load(&r->stop)) {
            for (unsigned p = 0; p < np; p++) {
                rconn *rc = pconn(r, &hk->cs, p, "house", 0);
                if (rc)
                    trim(r, rc, p);
            }
            /* Drained: nothing is waiting (the last metrics say so, not
             * the backlog read a second ago). */
            atomic_store(&r->ready, 0);
            atomic_store(&r->oldest_ready_ms, 0);
            atomic_store(&r->drained, 1);
            atomic_store(&r->stop, 1);
            break;
        }
        nap_ms(HOUSE_TICK_MS);
    }
out:
    oq__free(hp);
    return NULL;
}

/* ============================================================= export */

typedef struct hkv {
    char *key;
    size_t klen;
    char *val;
    unsigned part;        /* the partition it was read from */
} hkv;

static int kv_cmp(const void *a, const void *b)
{
    const hkv *x = a, *y = b;
    size_t n = OQ__MIN(x->klen, y->klen);
    int c = memcmp(x->key, y->key, n);
    if (c)
        return c;
    return (x->klen > y->klen) - (x->klen < y->klen);
}

/* By key, then partition. */
static int kv_part_cmp(const void *a, const void *b)
{
    const hkv *x = a, *y = b;
    int c = kv_cmp(a, b);
    return c ? c : (x->part > y->part) - (x->part < y->part);
}

/* Reads a hash field of S:meta into out ("" if none). */
static void meta_get(rconn *rc, const rkeys *k, const char *name, char *out,
                     size_t len)
{
    redisReply *rep = rc_cmdf(rc, "HGET %s %s", k->meta, name);
    out[0] = '\0';
    if (rep && rep->type == REDIS_REPLY_STRING)
        snprintf(out, len, "%s", rep->str);
    freeReplyObject(rep);
}

/* Writes partition k's records (commit order) to f. 0, or an exit status
 * with a message written. */
static int export_records(rconn *rc, const rkeys *k, FILE *f,
                          const char *cmd)
{
    char start[64] = "-";

    for (;;) {
        redisReply *rep = rc_cmdf(rc, "XRANGE %s %s + COUNT 1000",
                                  k->results, start);
        size_t ne;
        if (rep == NULL || rep->type != REDIS_REPLY_ARRAY) {
            fprintf(stderr, "onceq %s: %s\n", cmd, rep ? rep->str ? rep->str
                    : "bad reply" : rc->err);
            freeReplyObject(rep);
            return 3;
        }
        ne = rep->elements;
        for (size_t i = 0; i < ne; i++) {
            const redisReply *e = rep->element[i];
            const redisReply *rr = field(e->element[1], "r");
            if (rr && rr->type == REDIS_REPLY_STRING) {
                fwrite(rr->str, 1, rr->len, f);
                fputc('\n', f);
            }
            if (i + 1 == ne)
                snprintf(start, sizeof(start), "(%s", e->element[0]->str);
        }
        freeReplyObject(rep);
        if (ne < 1000)
            return 0;
    }
}

/* Counts read from Redis (of every partition). */
typedef struct hkvs {
    hkv *v;
    size_t n, cap;
} hkvs;

static void hkvs_free(hkvs *c)
{
    for (size_t i = 0; i < c->n; i++) {
        oq__free(c->v[i].key);
        free(c->v[i].val);
    }
    oq__free(c->v);
}

/* Adds the counts of hash key to c. 0, or an exit status with a message
 * written. */
static int read_counts(rconn *rc, const char *key, unsigned part, hkvs *c,
                       const char *cmd)
{
    char cursor[64] = "0";

    do {
        redisReply *rep = rc_cmdf(rc, "HSCAN %s %s COUNT 1000", key, cursor);
        const redisReply *items;
        if (rep == NULL || rep->type != REDIS_REPLY_ARRAY ||
            rep->elements != 2) {
            fprintf(stderr, "onceq %s: %s\n", cmd, rep && rep->str ? rep->str
                    : rc->err);
            freeReplyObject(rep);
            return 3;
        }
        snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str);
        items = rep->element[1];
        for (size_t i = 0; i + 1 < items->elements; i += 2) {
            hkv *x;
            if (c->n == c->cap) {
                size_t ncap = c->cap ? c->cap * 2 : 1024;
                hkv *nv = oq__realloc(c->v, ncap * sizeof(*nv));
                if (nv == NULL)
                    goto nomem;
                c->v = nv;
                c->cap = ncap;
            }
            x = &c->v[c->n];
            x->part = part;
            x->klen = items->element[i]->len;
            x->key = oq__malloc(x->klen + 1);
            x->val = strdup(items->element[i + 1]->str);
            if (x->key == NULL || x->val == NULL) {
                oq__free(x->key);
                free(x->val);
                goto nomem;
            }
            memcpy(x->key, items->element[i]->str, x->klen + 1);
            c->n++;
        }
        freeReplyObject(rep);
        continue;
nomem:
        freeReplyObject(rep);
        fprintf(stderr, "onceq %s: out of memory\n", cmd);
        return 3;
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

/* Writes the counts (sorted by key, as `onceq run` does; a key counted in
 * several partitions summed) or the records (commit order, partition
 * after partition) to f. 0, or an exit status with a message written. */
static int export_to(rconn *rc, const rparts *ps, FILE *f, const char *cmd)
{
    char output[32], count_key[256];
    hkvs c = { 0 };
    int status = 0;

    meta_get(rc, &ps->p[0].k, "output", output, sizeof(output));
    meta_get(rc, &ps->p[0].k, "count_key", count_key, sizeof(count_key));
    if (strcmp(output, "records") == 0) {
        for (unsigned p = 0; p < ps->n && status == 0; p++)
            status = export_records(rc, &ps->p[p].k, f, cmd);
        return status;
    }
    if (count_key[0] == '\0')
        snprintf(count_key, sizeof(count_key), "key");
    for (unsigned p = 0; p < ps->n && status == 0; p++)
        status = read_counts(rc, ps->p[p].k.counts, p, &c, cmd);
    if (status == 0 && c.n > 0)
        qsort(c.v, c.n, sizeof(*c.v), kv_part_cmp);
    /* A key's counts summed over the partitions; HSCAN may return a field
     * twice: once a partition. */
    for (size_t i = 0; status == 0 && i < c.n;) {
        oq__count_out co = { f, count_key };
        int64_t sum = 0;
        size_t j = i;
        for (; j < c.n && kv_cmp(&c.v[i], &c.v[j]) == 0; j++)
            if (j == i || c.v[j].part != c.v[j - 1].part)
                sum += (int64_t)strtoll(c.v[j].val, NULL, 10);
        oq__write_count(c.v[i].key, c.v[i].klen, sum, &co);
        i = j;
    }
    hkvs_free(&c);
    return status;
}

struct export_arg { rconn *rc; const rparts *ps; const char *cmd; };

static int export_fn(FILE *f, void *arg)
{
    const struct export_arg *a = arg;
    return export_to(a->rc, a->ps, f, a->cmd);
}

/* export_to a path ("-" or NULL: stdout; a file is replaced whole, or
 * not at all). */
static int export_path(rconn *rc, const rparts *ps, const char *path,
                       const char *cmd)
{
    struct export_arg a = { rc, ps, cmd };
    char prefix[64];

    snprintf(prefix, sizeof(prefix), "onceq %s", cmd);
    return oq__out_whole(path, prefix, "results", export_fn, &a);
}

/* ============================================================ the run */

/* This consumer's counts, in the terms of every mode's stats: a line is a
 * stream entry this consumer settled (`onceq send` skips blank lines, and
 * what is not settled stays pending in Redis, so blank and unfinished are
 * 0). */
static void counts_of(rrun *r, double el, oq__run_counts *n)
{
    rstats *s = &r->st;
    oq_pool *p = atomic_load(&r->p);
    oq_pool_stats ps = { 0 };

    if (p)
        oq_pool_stats_get(p, &ps);
    memset(n, 0, sizeof(*n));
    n->processed = atomic_load(&s->processed);
    n->duplicates = atomic_load(&s->duplicates);
    n->dead = atomic_load(&s->dead);
    n->lines = n->processed + n->duplicates + n->dead;
    for (int i = 0; i < OQ_DLQ__COUNT; i++)
        n->dead_by[i] = atomic_load(&s->dead_by[i]);
    n->retried = atomic_load(&s->retried);
    n->redelivered = atomic_load(&s->redelivered);
    n->fenced = ps.fenced;
    n->lease_extensions = p ? oq__pool_lease_extensions(p) : 0;
    n->workers = r->c.workers;
    n->handler = r->h.name;
    n->elapsed_s = el;
}

/* The metrics' snapshot (oq__metrics_fn), from the metrics threads:
 * everything it reads is atomic. This consumer's counters (the same as its
 * --stats); in_flight: the entries in our workers' hands; ready and the
 * oldest's age: the group's backlog as the housekeeper last saw it. */
static void metrics_snap(oq__metrics_snap *m, void *arg)
{
    rrun *r = arg;
    oq__run_counts n;
    int64_t oldest = atomic_load(&r->oldest_ready_ms);

    counts_of(r, 0, &n);
    m->processed = n.processed;
    m->duplicates = n.duplicates;
    m->dead = n.dead;
    m->retried = n.retried;
    memcpy(m->dead_by, n.dead_by, sizeof(m->dead_by));
    m->fenced = n.fenced;
    m->lease_extensions = n.lease_extensions;
    m->ready = atomic_load(&r->ready);
    m->oldest_ready_age_s = oldest > 0 && m->ready > 0
                                ? OQ__MAX(0, wall_ms() - oldest) / 1000.0
                                : 0;
    m->in_flight = 0;
    for (unsigned i = 0; i < r->c.workers; i++)
        m->in_flight += atomic_load(&r->inflight[i]);
    oq_pool *p = atomic_load(&r->p);
    if (p)
        oq__pool_histogram(p, m->hist, &m->hist_count, &m->hist_sum_s);
}

static uint64_t busy_of(rrun *r)
{
    oq_pool *p = atomic_load(&r->p);
    oq_pool_stats ps = { 0 };
    if (p)
        oq_pool_stats_get(p, &ps);
    return ps.busy;
}

/* A counter of S:stats, summed over the partitions. */
typedef struct fsum {
    char name[64];
    long long v;
} fsum;

/* The stream's stats (each partition's S:stats, summed by field, in the
 * order first seen) as one JSON object. */
static void write_stream_stats(FILE *f, const rparts *ps, rconn *rc)
{
    fsum sum[64];
    size_t n = 0;

    for (unsigned p = 0; p < ps->n; p++) {
        redisReply *rep = rc_cmdf(rc, "HGETALL %s", ps->p[p].k.stats);
        if (rep == NULL)
            break; /* Redis is gone: each partition would wait as long */
        for (size_t i = 0; rep && rep->type == REDIS_REPLY_ARRAY &&
                           i + 1 < rep->elements; i += 2) {
            const redisReply *k = rep->element[i], *v = rep->element[i + 1];
            size_t j = 0;
            if (k->type != REDIS_REPLY_STRING || k->len >= sizeof(sum->name) ||
                v->type != REDIS_REPLY_STRING)
                continue;
            while (j < n && strcmp(sum[j].name, k->str) != 0)
                j++;
            if (j == n) {
                if (n == sizeof(sum) / sizeof(sum[0]))
                    continue;
                memcpy(sum[n].name, k->str, k->len + 1);
                sum[n++].v = 0;
            }
            sum[j].v += strtoll(v->str, NULL, 10);
        }
        freeReplyObject(rep);
    }
    fputc('{', f);
    for (size_t j = 0; j < n; j++) {
        fprintf(f, "%s", j ? "," : "");
        oq__json_write_string(f, sum[j].name, strlen(sum[j].name));
        fprintf(f, ":%lld", sum[j].v);
    }
    fputc('}', f);
}

static void write_stats_json(FILE *f, rrun *r, double el, rconn *rc)
{
    rstats *s = &r->st;
    oq__run_counts n;

    counts_of(r, el, &n);
    oq__write_stats_head(f, &n);
    fprintf(f, ",\"busy\":%" PRIu64 ",\"settled_elsewhere\":%" PRIu64
            ",\"reconnects\":%d", busy_of(r),
            atomic_load(&s->settled_elsewhere), atomic_load(&r->reconnects));
    /* Request-reply: requests answered, and duplicates answered again, by
     * this consumer; replies without a request (--join-requests). */
    fprintf(f, ",\"requests\":%" PRIu64 ",\"replies\":%" PRIu64
            ",\"duplicate_replies\":%" PRIu64 ",\"late_replies\":%" PRIu64
            ",\"timeouts\":%" PRIu64 ",\"consumer\":",
            atomic_load(&s->requests),
            atomic_load(&s->replies),
            atomic_load(&s->duplicate_replies),
            atomic_load(&s->late_replies), atomic_load(&s->timeouts));
    oq__json_write_string(f, r->consumer, strlen(r->consumer));
    /* The stream's totals, all consumers and partitions together. */
    fputs(",\"stream\":", f);
    write_stream_stats(f, &r->ps, rc);
    fputs("}\n", f);
}



static void summary(rrun *r, double el, int sig)
{
    rstats *s = &r->st;
    oq__run_counts n;
    char who[300], dlq[600];

    if (r->c.quiet)
        return;
    counts_of(r, el, &n);
    snprintf(who, sizeof(who), "consumer %s", r->consumer);
    if (r->ps.tagged)
        snprintf(dlq, sizeof(dlq), "{%s:0..%u}:dlq", r->ps.base.stream,
                 r->ps.n - 1);
    else
        snprintf(dlq, sizeof(dlq), "%s", r->ps.base.dlq);
    oq__write_summary(&n, who, dlq, false, r->c.verbose);
    if (r->c.verbose)
        fprintf(stderr, "onceq: busy %" PRIu64 ", settled elsewhere %" PRIu64
                ", reconnects %d\n", busy_of(r),
                atomic_load(&s->settled_elsewhere),
                atomic_load(&r->reconnects));
    if (sig)
        fprintf(stderr, "onceq: stopped by %s; an exec: or coproc: handler "
                "that was running was stopped and its event scheduled again "
                "(retried); "
                "messages not started stay pending and are taken over "
                "after the visibility timeout\n",
                sig == SIGINT ? "SIGINT" : "SIGTERM");
}

static void progress_line(rrun *r)
{
    oq__run_counts n;
    char tail[64];

    counts_of(r, (mono_ms() - r->t0_ms) / 1000.0, &n);
    snprintf(tail, sizeof(tail), "  retried %" PRIu64, n.retried);
    oq__draw_progress(&n, tail);
}

/* Setup before the threads: handler, URL, first connection, group, meta.
 * 0, or an exit status (message written). */
static int run_setup(rrun *r, rconn *main_rc)
{
    oq__handler_opts ho = { r->c.kill_grace_ms, false };
    char err[1024];
    char host[200];
    int st;

    if (parse_url(r->c.redis_url, r->c.redis_password_file, "run", &r->u,
                  err, sizeof(err)) != 0)
        return oq__usage_error("run", "%s", err);
    if (oq__handler_from_spec(r->c.handler_spec, &ho, &r->h, err,
                              sizeof(err)) != 0)
        return oq__usage_error("run", "%s", err);
    r->idspec.field = r->c.id_field;
    r->idspec.fallback = strcmp(r->c.id_field, "id") == 0;
    if (r->c.consumer) {
        snprintf(r->consumer, sizeof(r->consumer), "%s", r->c.consumer);
    } else {
        if (gethostname(host, sizeof(host)) != 0)
            snprintf(host, sizeof(host), "localhost");
        host[sizeof(host) - 1] = '\0';
        snprintf(r->consumer, sizeof(r->consumer), "%s:%ld", host,
                 (long)getpid());
    }
    r->nonce = make_nonce();
    snprintf(main_rc->name, sizeof(main_rc->name), "onceq:%s:main",
             r->consumer);
    for (char *p = main_rc->name; *p; p++)
        if (*p == ' ')
            *p = '_';
    if (rc_first(main_rc, &r->u, "run") != 0)
        return 2;
    r->cluster = atomic_load(&r->u.cluster);
    if (r->c.join_requests && r->c.partitions)
        return oq__usage_error("run", "--join-requests reads a stream of "
                           "replies, which has no partitions: leave "
                           "--partitions out");
    if ((st = check_policy_all(main_rc, &r->u, "run")) != 0 ||
        (st = parts_open(&r->ps, main_rc, r->c.stream, r->c.partitions, 1,
                         "run")) != 0)
        return st;
    r->nconn = r->cluster ? r->ps.n : 1;
    if (r->cluster) {
        if ((r->where = oq__calloc(r->ps.n, sizeof(*r->where))) == NULL) {
            fprintf(stderr, "onceq run: out of memory\n");
            return 3;
        }
        map_refresh(r, main_rc);
    }
    if (r->ps.tagged && r->c.join_requests)
        return oq__usage_error("run", "--join-requests reads a stream of "
                           "replies, which has no partitions: stream '%s' "
                           "has %u", r->c.stream, r->ps.n);
    /* Each partition as a stream of its own; the retention is the first
     * one's (they are fixed together, at the stream's first run). */
    for (unsigned p = 0; p < r->ps.n; p++) {
        rpart *pt = &r->ps.p[p];
        if ((st = check_types(main_rc, &pt->k, "run", 1)) != 0 ||
            (st = check_group(main_rc, &pt->k, r->c.group)) != 0)
            return st;
        if (ensure_group(r, main_rc, p) != 0) {
            fprintf(stderr, "onceq run: %s\n", r->fatal_msg);
            return 2;
        }
        if ((st = stream_epoch(main_rc, &pt->k, "run", pt->epoch,
                               sizeof(pt->epoch))) != 0 ||
            (st = stream_retention(main_rc, &pt->k, "run",
                                   p ? r->retention_ms : r->c.retention_ms,
                                   1, &r->retention_ms)) != 0)
            return st;
        if ((st = stream_output(main_rc, &pt->k, &r->h,
                                r->c.handler_spec)) != 0)
            return st;
    }
    snprintf(r->retention, sizeof(r->retention), "%" PRId64,
             r->retention_ms);
    r->dm_load = dm_load(main_rc);
    return 0;
}

/* Starts the housekeeper and the engine on the Redis backends. 0, or an
 * exit status. */
static int start_threads(rrun *r, house *hk)
{
    oq_pool_opts po;
    oq__engine_hooks hooks = { oq__replies_stage, NULL, r->c.max_attempts };
    oq_pool *p;
    int rc;

    hk->r = r;
    if (pconn(r, &hk->cs, 0, "house", 0) == NULL) {
        fprintf(stderr, "onceq run: %s\n", r->fatal_msg);
        return 2;
    }
    if (pthread_create(&hk->th, NULL, house_main, hk) != 0)
        return 3;
    oq_pool_opts_defaults(&po);
    po.workers = r->c.workers;
    po.batch = r->c.batch;
    po.backoff_base_ms = r->c.backoff_base_ms;
    po.backoff_cap_ms = r->c.backoff_cap_ms;
    po.busy_retry_ms = BUSY_RETRY_MS;
    po.poll_ms = BLOCK_MS;
    po.seed = r->c.seed ? r->c.seed : r->nonce;
    po.handler = r->h.fn;
    po.handler_arg = r->h.arg;
    po.handler_never_blocks = r->h.never_blocks;
    po.lease_ms = r->c.vt_ms;
    po.timeout_ms = r->c.timeout_ms;
    po.decode = rdecode;
    po.free_parsed = rfree;
    po.decode_arg = r;
    /* Requests: the engine stages each reply's body; the COMMIT script
     * writes it with the id (docs/REQUEST-REPLY.md). */
    rc = oq__engine_start_hooks(&p, &oq__redis_queue_methods, r,
                                &oq__redis_ledger_methods, r, &po, &hooks);
    if (rc != 0) {
        fprintf(stderr, "onceq run: cannot start the workers: %s\n",
                oq_strerror(rc));
        atomic_store(&r->hurry, 1);
        atomic_store(&r->stop, 1);
        pthread_join(hk->th, NULL);
        return 3;
    }
    atomic_store(&r->p, p);
    return 0;
}

static void free_workers(rrun *r, house *hk)
{
    oq_pool_free(atomic_exchange(&r->p, NULL));
    conns_close(r, &hk->cs);
    for (size_t i = 0; i < r->nreclaimed; i++)
        entry_free(r->reclaimed[i]);
    oq__free(r->reclaimed);
    oq__free(r->inflight);
}

/* Waits for the end (drained or fatal) or a signal, drawing the progress
 * line every 200 ms when asked; returns the signal. */
static int wait_end(rrun *r, const sigset_t *sigs)
{
    struct timespec tick = { 0, 20 * 1000 * 1000 };
    for (unsigned n = 1; !atomic_load(&r->stop); n++) {
        int sig = sigtimedwait(sigs, NULL, &tick);
        if (sig == SIGINT || sig == SIGTERM)
            return sig;
        if (r->c.progress && n % 10 == 0)
            progress_line(r);
    }
    return 0;
}

int oq__redis_run(const oq__run_config *c)
{
    rrun *r = oq__calloc(1, sizeof(*r));
    oq__outfile out = { 0 }, stats = { 0 };
    rconn main_rc = { 0 };
    house hk = { 0 };
    oq__metrics *metrics = NULL;
    char err[1024];
    sigset_t sigs, old;
    int status, sig = 0, st2, merr;
    double el;

    if (r == NULL)
        return 3;
    oq__mutex_init(&r->mu);
    oq__mutex_init(&r->map_mu);
    r->c = *c;
    /* The outputs are opened before anything runs (a path that cannot
     * be written: exit 2, as in memory), written at the end, and renamed
     * over their paths only then (a run that fails leaves them as they
     * were). */
    if (oq__check_outputs(c, err, sizeof(err)) != 0 ||
        oq__out_begin(&out, c->out_path, "results", err, sizeof(err)) != 0 ||
        oq__out_begin(&stats, c->stats_path, "stats", err,
                      sizeof(err)) != 0) {
        fprintf(stderr, "onceq run: %s\n", err);
        status = 2;
        goto out_free;
    }
    status = run_setup(r, &main_rc);
    if (status != 0)
        goto out_free;
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, &old);
    r->inflight = oq__calloc(r->c.workers, sizeof(*r->inflight));
    if (r->inflight == NULL) {
        status = 3;
        goto out_mask;
    }
    if (c->metrics_path || c->metrics_listen) {
        oq__metrics_opts mo = { c->metrics_path, c->metrics_interval_ms,
                                c->metrics_listen, metrics_snap, r };
        if (oq__metrics_start(&metrics, &mo, err, sizeof(err)) != 0) {
            fprintf(stderr, "onceq run: %s\n", err);
            status = 2;
            goto out_mask;
        }
    }
    r->t0_ms = mono_ms();
    if ((status = start_threads(r, &hk)) != 0)
        goto out_mask;
    sig = wait_end(r, &sigs);
    if (sig)
        atomic_store(&r->hurry, 1);
    atomic_store(&r->stop, 1);
    if (sig)
        oq__handler_cancel(&r->h);
    oq_pool_stop(atomic_load(&r->p), -1);
    pthread_join(hk.th, NULL);
    /* The last metrics, with every worker stopped: they equal --stats. */
    merr = metrics && oq__metrics_stop(metrics) != 0;
    metrics = NULL;
    if (r->c.progress) {
        progress_line(r); /* the final state stays on the screen */
        fputc('\n', stderr);
    }
    el = (mono_ms() - r->t0_ms) / 1000.0;
    status = 0;
    if (r->fatal) {
        fprintf(stderr, "onceq run: %s\n", r->fatal_msg);
        status = 3;
    }
    /* After a fatal error (Redis gone, say) the stats are read without
     * reconnecting; else, as for a signal, with. */
    main_rc.stop = r->fatal ? &r->stop : NULL;
    if (out.f && !r->fatal) {
        st2 = export_to(&main_rc, &r->ps, out.f, "run");
        st2 = st2 ? st2 : oq__out_commit(&out, "onceq run");
        status = status ? status : st2;
    }
    if (stats.f) {
        write_stats_json(stats.f, r, el, &main_rc);
        st2 = oq__out_commit(&stats, "onceq run");
        status = status ? status : st2;
    }
    if (merr) {
        fprintf(stderr, "onceq run: write error on metrics '%s'\n",
                c->metrics_path);
        status = status ? status : 3;
    }
    summary(r, el, sig);
    if (sig)
        status = sig == SIGINT ? 130 : 143;
    else if (status == 0 && atomic_load(&r->st.dead) > 0)
        status = 1;
out_mask:
    if (metrics)
        oq__metrics_stop(metrics);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
out_free:
    oq__out_discard(&out, false);
    oq__out_discard(&stats, false);
    free_workers(r, &hk);
    rc_close(&main_rc);
    parts_free(&r->ps);
    oq__free(r->where);
    if (r->h.fn)
        oq__handler_free(&r->h);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->map_mu);
    oq__free(r);
    return status;
}

/* ------------------------------------------- the backends, for tests */

/*
 * The Redis queue backend and ledger without `onceq run` around them, so
 * that the conformance tests can drive them (and the engine) from C. The
 * housekeeper runs too: without its XAUTOCLAIM an entry whose delivery
 * ran out would never be delivered again. No handler, metrics or drain.
 */
typedef struct rbackends {
    rrun r;
    house hk;
    bool house_started;
} rbackends;

int oq__redis_backends_open(void **out, const char *url, const char *stream,
                            const char *group, int64_t vt_ms,
                            unsigned max_attempts, unsigned workers,
                            unsigned batch)
{
    rbackends *b = oq__calloc(1, sizeof(*b));
    rrun *r;
    rconn rc = { 0 };
    char err[1024];
    int st;

    if (b == NULL)
        return OQ_ENOMEM;
    r = &b->r;
    oq__mutex_init(&r->mu);
    r->c.redis_url = url;
    r->c.stream = stream;
    r->c.group = group;
    r->c.vt_ms = vt_ms;
    r->c.max_attempts = max_attempts;
    r->c.workers = workers;
    r->c.batch = batch;
    snprintf(r->consumer, sizeof(r->consumer), "test:%ld", (long)getpid());
    r->nonce = make_nonce();
    r->inflight = oq__calloc(workers, sizeof(*r->inflight));
    st = r->inflight == NULL ? OQ_ENOMEM : OQ_EINVAL;
    if (r->inflight == NULL ||
        parse_url(url, NULL, "test", &r->u, err, sizeof(err)) != 0 ||
        rc_first(&rc, &r->u, "test") != 0)
        goto fail;
    if (parts_open(&r->ps, &rc, stream, 0, 1, "test") != 0) {
        rc_close(&rc);
        goto fail;
    }
    r->nconn = 1;
    /* As run_setup does for a run: the group, the stream's epoch and
     * retention (the scripts read them), the done-marks' bucket load. */
    st = ensure_group(r, &rc, 0) == 0 &&
         stream_epoch(&rc, &r->ps.p[0].k, "test", r->ps.p[0].epoch,
                      sizeof(r->ps.p[0].epoch)) == 0 &&
         stream_retention(&rc, &r->ps.p[0].k, "test", 0, 1,
                          &r->retention_ms) == 0
             ? 0 : OQ_EIO;
    snprintf(r->retention, sizeof(r->retention), "%" PRId64,
             r->retention_ms);
    r->dm_load = dm_load(&rc);
    rc_close(&rc);
    if (st != 0)
        goto fail;
    b->hk.r = r;
    st = OQ_EIO;
    if (pconn(r, &b->hk.cs, 0, "house", 0) == NULL ||
        pthread_create(&b->hk.th, NULL, house_main, &b->hk) != 0)
        goto fail;
    b->house_started = true;
    *out = b;
    return 0;
fail:
    oq__redis_backends_close(b);
    return st;
}

void oq__redis_backends_close(void *backends)
{
    rbackends *b = backends;
    rrun *r;

    if (b == NULL)
        return;
    r = &b->r;
    atomic_store(&r->hurry, 1);
    atomic_store(&r->stop, 1);
    if (b->house_started)
        pthread_join(b->hk.th, NULL);
    conns_close(r, &b->hk.cs);
    parts_free(&r->ps);
    for (size_t i = 0; i < r->nreclaimed; i++)
        entry_free(r->reclaimed[i]);
    oq__free(r->reclaimed);
    oq__free(r->inflight);
    pthread_mutex_destroy(&r->mu);
    oq__free(b);
}

/* ====================================================== export and dlq */

/* A stream that onceq has never used (a mistyped --stream): 2, with a
 * message, instead of an empty export or list; else 0. */
static int stream_known(rconn *rc, const rparts *ps, const char *cmd)
{
    redisReply *rep = rc_cmdf(rc, "EXISTS %s %s", ps->p[0].k.meta,
                              ps->p[0].k.stream);
    int st = 0;

    if (rep == NULL || rep->type != REDIS_REPLY_INTEGER) {
        fprintf(stderr, "onceq %s: %s\n", cmd, rep == NULL ? rc->err
                : rep->type == REDIS_REPLY_ERROR ? rep->str : "bad reply");
        st = rep == NULL ? 2 : 3;
    } else if (rep->integer == 0) {
        fprintf(stderr, "onceq %s: Redis at %s has no stream '%s' (check "
                "--stream and the database in the URL)\n", cmd,
                rc->u->text, ps->p[0].k.stream);
        st = 2;
    }
    freeReplyObject(rep);
    return st;
}

int oq__redis_export(const oq__tool_cfg *c)
{
    rconn rc = { 0 };
    rurl u;
    rparts ps;
    char err[1024];
    int st;

    if (parse_url(c->url, c->pwfile, "export", &u, err, sizeof(err)) != 0)
        return oq__usage_error("export", "%s", err);
    if (rc_first(&rc, &u, "export") != 0)
        return 2;
    if ((st = parts_open(&ps, &rc, c->stream, 0, 0, "export")) == 0 &&
        (st = stream_known(&rc, &ps, "export")) == 0)
        st = export_path(&rc, &ps, c->out_path, "export");
    parts_free(&ps);
    rc_close(&rc);
    return st;
}

/* One dead letter, by the one writer of dead letters (plus its dlq_id). */
static void write_dead(FILE *f, const redisReply *e)
{
    const redisReply *kv = e->element[1];
    const redisReply *id = field(kv, "id"), *reason = field(kv, "reason"),
                     *error = field(kv, "error"), *src = field(kv, "source"),
                     *ev = field(kv, "event");
    oq__dead_row d = {
        .source = src && src->str ? src->str : "",
        .id = id && id->len > 0 ? id->str : NULL,
        .id_len = id ? id->len : 0,
        .reason = reason && reason->str ? reason->str : "",
        .error = error && error->str ? error->str : "",
        .attempts = (uint32_t)field_u64(kv, "attempts", UINT32_MAX),
        .first_seen_ms = (int64_t)field_u64(kv, "first_seen", INT64_MAX),
        .dead_ms = (int64_t)field_u64(kv, "last_seen", INT64_MAX),
        .event = ev && ev->str ? ev->str : "",
        .event_len = ev ? ev->len : 0,
        .dlq_id = e->element[0]->str,
    };

    oq__write_dead_row(f, &d, false);
}

static int dlq_match(const oq__tool_cfg *c, const char *show, const redisReply *e)
{
    const redisReply *kv = e->element[1];
    const redisReply *id = field(kv, "id"), *reason = field(kv, "reason");
    const char *ids = id && id->str ? id->str : "";
    if (show)
        return strcmp(ids, show) == 0 || strcmp(e->element[0]->str, show) == 0;
    if (c->reason && (!reason || !reason->str ||
                      strcmp(reason->str, c->reason) != 0))
        return 0;
    if (c->id_glob && fnmatch(c->id_glob, ids, 0) != 0)
        return 0;
    return 1;
}


/* Applies one action to one matching dead letter. 0 or -1. */
static int dlq_act(rconn *rc, const rkeys *k, int64_t retention, int action,
                   const redisReply *e)
{
    const redisReply *kv = e->element[1];
    const redisReply *id = field(kv, "id"), *reason = field(kv, "reason"),
                     *ev = field(kv, "event"), *src = field(kv, "source");
    redisReply *rep;
    int ok;

    if (action == OQ__DLQ_PURGE) {
        rep = rc_cmdf(rc, "XDEL %s %s", k->dlq, e->element[0]->str);
    } else {
        abuf keys = { 0 }, args = { 0 };
        ab_adds(&keys, k->stream);
        ab_adds(&keys, k->dlq);
        ab_adds(&keys, k->stats);
        ab_add2(&keys, k->idpfx, k->idpfx_len, id ? id->str : "",
                id ? id->len : 0);
        ab_adds(&args, e->element[0]->str);
        ab_add(&args, ev ? ev->str : "", ev ? ev->len : 0);
        ab_add(&args, src ? src->str : "", src ? src->len : 0);
        ab_adds(&args, reason && reason->str ? reason->str : "");
        if (id && id->len > 0)
            ab_add_mark(&args, id->str, id->len);
        else
            ab_add(&args, "", 0);
        ab_adds(&args, k->dm);
        ab_addi(&args, retention);
        rep = rc_script(rc, SC_REDRIVE, &keys, &args);
        ab_free(&keys);
        ab_free(&args);
    }
    ok = rep && rep->type == REDIS_REPLY_INTEGER;
    if (!ok)
        fprintf(stderr, "onceq dlq: Redis: %s\n", rep && rep->str ? rep->str
                : rc->err);
    freeReplyObject(rep);
    return ok ? 0 : -1;
}

/* The action on the matching dead letters of partition k; adds to
 * *matched. 0, or an exit status with a message written. */
static int dlq_partition(rconn *rc, const oq__tool_cfg *c, const char *show,
                         int action, const rkeys *k, int64_t retention,
                         uint64_t *matched)
{
    char start[64] = "-";
    int st = 0;

    for (;;) {
        redisReply *rep = rc_cmdf(rc, "XRANGE %s %s + COUNT 500", k->dlq,
                                  start);
        size_t ne;
        if (rep == NULL || rep->type != REDIS_REPLY_ARRAY) {
            fprintf(stderr, "onceq dlq: %s\n", rep && rep->str ? rep->str
                    : rc->err);
            freeReplyObject(rep);
            return 3;
        }
        ne = rep->elements;
        for (size_t i = 0; i < ne && st == 0; i++) {
            const redisReply *e = rep->element[i];
            if (i + 1 == ne)
                snprintf(start, sizeof(start), "(%s", e->element[0]->str);
            if (e->element[1]->type != REDIS_REPLY_ARRAY ||
                !dlq_match(c, show, e))
                continue;
            (*matched)++;
            if (action == OQ__DLQ_LIST || action == OQ__DLQ_SHOW)
                write_dead(stdout, e);
            else if (!c->dry_run && dlq_act(rc, k, retention, action, e) != 0)
                st = 3;
        }
        freeReplyObject(rep);
        if (ne < 500 || st != 0)
            return st;
    }
}

int oq__redis_dlq(const oq__tool_cfg *c, int action, const char *show)
{
    rconn rc = { 0 };
    rurl u;
    rparts ps;
    char err[1024];
    int st;
    int64_t retention = 0;
    uint64_t matched = 0;

    if (parse_url(c->url, c->pwfile, "dlq", &u, err, sizeof(err)) != 0)
        return oq__usage_error("dlq", "%s", err);
    if (rc_first(&rc, &u, "dlq") != 0)
        return 2;
    if ((st = parts_open(&ps, &rc, c->stream, 0, 0, "dlq")) != 0 ||
        (st = stream_known(&rc, &ps, "dlq")) != 0 ||
        (action == OQ__DLQ_REDRIVE &&
         (st = stream_retention(&rc, &ps.p[0].k, "dlq", 0, 0,
                                &retention)) != 0)) {
        parts_free(&ps);
        rc_close(&rc);
        return st;
    }
    /* Each partition's dead letters; a redriven one goes back into its
     * own partition (the partition of its id). */
    for (unsigned p = 0; p < ps.n && st == 0; p++)
        st = dlq_partition(&rc, c, show, action, &ps.p[p].k, retention,
                           &matched);
    parts_free(&ps);
    if (st == 0 && action == OQ__DLQ_REDRIVE)
        printf("%s %" PRIu64 " dead letters\n",
               c->dry_run ? "would redrive" : "redrove", matched);
    else if (st == 0 && action == OQ__DLQ_PURGE)
        printf("%s %" PRIu64 " dead letters\n",
               c->dry_run ? "would purge" : "purged", matched);
    else if (st == 0 && action == OQ__DLQ_SHOW && matched == 0) {
        fprintf(stderr, "onceq dlq: no dead letter with id '%s'\n", show);
        st = 1;
    }
    if (fflush(stdout) != 0 && st == 0)
        st = 3;
    rc_close(&rc);
    return st;
}
