// Package ringcache is the Go client of ringcache, a distributed in-memory
// cache served over gRPC.
//
// A Client talks to an orchestrator (or, for tests, straight to one cache
// node) and wraps the generated stubs in package
// github.com/ringcache/ringcache/clients/go/gen/ringcache/v1 with what a
// Go service wants: context deadlines, time.Duration TTLs, []byte values,
// errors that keep their gRPC code, retries where they are safe, and
// OpenTelemetry trace propagation.
//
//	c, err := ringcache.Dial("localhost:50051")
//	if err != nil { ... }
//	defer c.Close()
//	_, err = c.Set(ctx, "user:42", []byte(`{"name":"Ada"}`), 10*time.Minute)
//	item, err := c.Get(ctx, "user:42")
//	if errors.Is(err, ringcache.ErrCacheMiss) { ... }
//
// # Errors
//
// Every error from a call carries its gRPC code: status.Code(err) gives
// it (codes.InvalidArgument for a key over the limit, codes.Unavailable
// when no node could be reached, ...). A miss is not a gRPC error: Get
// answers ErrCacheMiss. Batch calls answer per key, each result with its
// own error.
//
// # Direct mode
//
// WithDirect(true) sends Get straight to the key's owner node when that is
// as safe as reading through the orchestrator (see direct.go); writes and
// batches still go through the orchestrator. WithNearCache(bytes) also
// answers repeated Gets from this process, kept fresh by the nodes' change
// feeds (see nearcache.go); NearCacheStats counts its hits.
//
// # Pipelines
//
// Single-key calls (Get, Set, SetIfAbsent, CompareAndSwap, Delete,
// CompareAndDelete) are pipelined: the client keeps a few
// ringcache.v1.Cache/Pipeline streams (WithPipelines, 2 by default) and
// sends each call as one message on one of them, which costs the client
// and the servers a fraction of a unary call. Callers see no difference.
// WithUnary sends every call as a unary call instead; a server without
// Pipeline is detected and called unary.
//
// # Retries
//
// Batch calls (GetMany, SetMany) and, with WithUnary, the single-key calls
// that may safely run twice — Get and the unconditional Set and Delete —
// are retried when the orchestrator answers UNAVAILABLE or
// RESOURCE_EXHAUSTED, with exponential backoff and full jitter, within the
// context's deadline. Conditional writes (SetIfAbsent, CompareAndSwap,
// CompareAndDelete) are never retried on the unary path.
//
// Pipelined calls follow a stricter rule, the orchestrator's own: a call
// is sent again (same policy, within the deadline) only if it provably
// never ran — its stream could not be opened, or the server ended the
// stream cleanly without answering it (it marks such an end with the
// ringcache-unanswered-not-run trailer) — or the server shed it ("retry
// with backoff"), or it is a Get whose connection was lost. A write whose
// connection was lost before its answer may have run: it fails with
// UNAVAILABLE rather than running twice.
//
// # Tracing
//
// Dial installs otelgrpc's client handler: each unary call is a CLIENT
// span under the span in its context, and the trace context travels to the
// orchestrator, which continues the trace to the cache nodes. A pipelined
// call is a CLIENT span of its own with the same name and attributes,
// whose context travels with the op. Configure the global TracerProvider
// and propagator (otel.SetTracerProvider, otel.SetTextMapPropagator) as
// for any instrumented Go service.
package ringcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/ringcache/ringcache/clients/go/gen/ringcache/v1"
)

// ErrCacheMiss is what Get answers for a key that holds no live value.
var ErrCacheMiss = errors.New("ringcache: cache miss")

// Item is a cached value.
type Item struct {
	// Value is the stored bytes.
	Value []byte
	// Version is the key's version: it grows with every write of the key,
	// and CompareAndSwap / CompareAndDelete take it.
	Version uint64
	// TTL is the time left before the key expires; 0 means no expiry.
	TTL time.Duration
}

// Entry is one write of SetMany.
type Entry struct {
	Key   string
	Value []byte
	// TTL is how long the key lives; 0 means no expiry.
	TTL time.Duration
}

// GetResult answers one key of GetMany.
type GetResult struct {
	Key string
	// Item is the value when Err is nil.
	Item Item
	// Err is ErrCacheMiss for a miss, or an error with the gRPC code of
	// why this key could not be read (the others may have been).
	Err error
}

// SetResult answers one entry of SetMany.
type SetResult struct {
	Key string
	// Version is the key's new version when Err is nil.
	Version uint64
	// Err says why this entry was not written (with its gRPC code).
	Err error
}

// RetryPolicy says how calls that may safely run twice are retried.
type RetryPolicy struct {
	// Attempts is the most tries of one call, the first included; 1
	// turns retries off.
	Attempts int
	// Backoff is the first wait; it doubles with each retry, up to
	// MaxBackoff, and each wait is drawn uniformly below it (full jitter).
	Backoff    time.Duration
	MaxBackoff time.Duration
}

// DefaultRetryPolicy is what Dial uses unless told otherwise:
// three tries, waiting below 20 ms then below 40 ms.
var DefaultRetryPolicy = RetryPolicy{Attempts: 3, Backoff: 20 * time.Millisecond, MaxBackoff: time.Second}

// Option configures a Client.
type Option func(*options)

type options struct {
	retry     RetryPolicy
	dialOpts  []grpc.DialOption
	pipelines int
	timeout   time.Duration
	token     string
	telemetry bool
	direct    bool
	// The near cache's bound in bytes (0: none) and its answers' age.
	nearBytes  uint64
	nearMaxAge time.Duration
}

// WithTimeout sets the deadline of calls whose context has none (1 s by
// default; 0: none).
func WithTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithToken sends token as "authorization: Bearer <token>" on every call
// (servers started with --auth-tokens). Use it with TLS credentials
// (WithDialOptions) outside a trusted network: over plaintext the token
// travels in the clear.
func WithToken(token string) Option {
	return func(o *options) { o.token = token }
}

// WithoutTelemetry turns trace spans and propagation off (no otelgrpc
// handler, no span per pipelined call).
func WithoutTelemetry() Option {
	return func(o *options) { o.telemetry = false }
}

// bearer is a token as per-call credentials.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: a cluster may run tokens without TLS
// on a trusted network (see WithToken).
func (bearer) RequireTransportSecurity() bool { return false }

// WithPipelines sets how many Pipeline streams single-key calls are spread
// over (2 by default); 0 sends every call as a unary call.
func WithPipelines(n int) Option {
	return func(o *options) { o.pipelines = max(n, 0) }
}

// WithUnary sends every call as a unary call, as before pipelines: each
// call is its own HTTP/2 stream, traced by otelgrpc.
func WithUnary() Option { return WithPipelines(0) }

// WithRetryPolicy replaces DefaultRetryPolicy.
func WithRetryPolicy(p RetryPolicy) Option {
	return func(o *options) { o.retry = p }
}

// WithNearCache keeps Get answers in this process, at most bytes of them
// (keys, values and NearCacheEntryOverhead each; 0, the default: no near
// cache), and answers repeated Gets from there. It turns direct mode on:
// the near cache is kept fresh by the nodes' change feeds, which direct
// mode follows, and answers only while every feed is in sync; it fills
// only from answers read straight from a key's owner. A change made by
// any client is seen as soon as its node's feed delivers it (about a
// millisecond on a LAN); this client's own writes through this Client are
// seen at once. See the README's "Direct mode and the near cache".
func WithNearCache(bytes uint64) Option {
	return func(o *options) { o.nearBytes = bytes }
}

// WithNearCacheMaxAge sets the longest an answer is served from the near
// cache (DefaultNearCacheMaxAge, 30 s, unless set): the bound on staleness
// if everything else fails. It must be positive.
func WithNearCacheMaxAge(d time.Duration) Option {
	return func(o *options) { o.nearMaxAge = d }
}

// WithDialOptions adds gRPC dial options (for example TLS credentials,
// which replace the default plaintext transport).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Client calls ringcache. It is safe for concurrent use; one Client (one
// HTTP/2 connection, multiplexed) serves a whole process.
type Client struct {
	conn  *grpc.ClientConn
	cache pb.CacheClient
	retry RetryPolicy
	// Single-key calls go on these (none: unary calls).
	pipes    []*pipe
	nextPipe atomic.Uint64
	// The server has no Pipeline: unary calls from then on.
	noPipeline atomic.Bool
	// The deadline of calls whose context has none (0: none).
	timeout time.Duration
	// Spans for pipelined calls.
	telemetry bool
	// Direct mode (WithDirect, WithNearCache): nil when off.
	direct *direct
}

// Dial connects to the orchestrator at target ("host:port", or any gRPC
// target such as "dns:///ringcache.default.svc:50051"). The connection is
// made lazily, on the first call. Plaintext unless WithDialOptions gives
// transport credentials.
func Dial(target string, opts ...Option) (*Client, error) {
	o := options{retry: DefaultRetryPolicy, pipelines: 2, timeout: time.Second, telemetry: true, nearMaxAge: DefaultNearCacheMaxAge}
	for _, opt := range opts {
		opt(&o)
	}
	var near *nearCache
	if o.nearBytes > 0 {
		if o.nearMaxAge <= 0 {
			return nil, fmt.Errorf("ringcache: the near cache's maximum age must be positive, not %v", o.nearMaxAge)
		}
		var err error
		if near, err = newNearCache(o.nearBytes, o.nearMaxAge); err != nil {
			return nil, fmt.Errorf("ringcache: near cache: %w", err)
		}
	}
	dial := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Fixed flow-control windows: they turn off grpc-go's bandwidth
		// estimation, whose PING frames on every burst of small messages
		// made the servers answer a PING ACK per op — about half of a
		// cache node's system calls per pipelined Get (BENCHMARKS.md, "Go
		// client"). 4 MiB per stream holds the largest default message.
		grpc.WithInitialWindowSize(4 << 20),
		grpc.WithInitialConnWindowSize(16 << 20),
	}
	if o.telemetry {
		// A pipeline is not one call: each op gets its own span instead.
		notPipeline := otelgrpc.WithFilter(func(info *stats.RPCTagInfo) bool {
			return info.FullMethodName != pipelineMethod
		})
		dial = append(dial, grpc.WithStatsHandler(otelgrpc.NewClientHandler(notPipeline)))
	}
	if o.token != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer(o.token)))
	}
	dial = append(dial, o.dialOpts...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("ringcache: dial %s: %w", target, err)
	}
	c := &Client{conn: conn, cache: pb.NewCacheClient(conn), retry: o.retry, timeout: o.timeout, telemetry: o.telemetry}
	for range o.pipelines {
		c.pipes = append(c.pipes, &pipe{cache: c.cache})
	}
	if o.direct || near != nil {
		// Nodes are dialled as the orchestrator is (TLS, token, tracing).
		c.direct = startDirect(conn, dial, max(o.pipelines, 1), near)
	}
	return c, nil
}

// noteMissed tells direct mode which owners a write of key missed (its
// answer's missed): they are kept off for the key until up to date. It
// also voids the key's near-cache answer: this client wrote it (whatever
// the write's outcome, it may have run).
func (c *Client) noteMissed(key string, missed []string) {
	if c.direct != nil {
		c.direct.missed(key, missed)
		if c.direct.near != nil {
			c.direct.near.invalidate(key)
		}
	}
}

// Close closes the connections.
func (c *Client) Close() error {
	if c.direct != nil {
		c.direct.close()
	}
	return c.conn.Close()
}

// Cache is the generated stub, for the calls this wrapper does not cover
// (Increment, Touch, Exists, DeleteMany, conditional SetMany).
func (c *Client) Cache() pb.CacheClient { return c.cache }

// errorDomain is the google.rpc.ErrorInfo domain of ringcache's refusals.
const errorDomain = "ringcache.dev"

// shed reports whether err is the servers' load shedding: refused before
// it ran, unlike a RESOURCE_EXHAUSTED that says the answer is too large
// (asking again gets the same answer). The servers name which in a
// google.rpc.ErrorInfo (OVERLOADED or TOO_LARGE); older ones said "retry
// with backoff" in the message.
func shed(err error) bool {
	s, ok := status.FromError(err)
	if !ok || s.Code() != codes.ResourceExhausted {
		return false
	}
	for _, d := range s.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == errorDomain {
			return info.GetReason() == "OVERLOADED"
		}
	}
	return strings.Contains(s.Message(), "retry with backoff")
}

// retryable reports whether err is worth another try: shed calls always
// (they never ran), UNAVAILABLE only for reads (a write may have run before
// its connection broke; a write that never left the client grpc-go retries
// by itself, transparently).
func retryable(err error, read bool) bool {
	return shed(err) || (read && status.Code(err) == codes.Unavailable)
}

// withTimeout gives ctx the client's default timeout if it has no
// deadline.
func (c *Client) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, has := ctx.Deadline(); has || c.timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}

// do runs call, retrying as the policy says while ctx allows; read: the
// call only reads.
func (c *Client) do(ctx context.Context, read bool, call func(context.Context) error) error {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	backoff := c.retry.Backoff
	var err error
	for attempt := 1; ; attempt++ {
		err = call(ctx)
		if err == nil || !retryable(err, read) || attempt >= c.retry.Attempts {
			return err
		}
		wait := time.Duration(0)
		if backoff > 0 {
			wait = time.Duration(rand.Int64N(int64(backoff)))
		}
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= wait {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff *= 2
		if c.retry.MaxBackoff > 0 && backoff > c.retry.MaxBackoff {
			backoff = c.retry.MaxBackoff
		}
	}
}

func ttlProto(ttl time.Duration) (*durationpb.Duration, error) {
	switch {
	case ttl < 0:
		return nil, status.Errorf(codes.InvalidArgument, "ringcache: negative TTL %v", ttl)
	case ttl == 0:
		return nil, nil
	default:
		return durationpb.New(ttl), nil
	}
}

func ttlOf(d *durationpb.Duration) time.Duration {
	if d == nil {
		return 0
	}
	return d.AsDuration()
}

// keyError turns a per-key error of a batch answer into an error with
// its gRPC code.
func keyError(e *pb.KeyError) error {
	if e == nil {
		return nil
	}
	return status.Error(codes.Code(e.GetCode()), e.GetMessage())
}

// Get reads key. A key with no live value answers ErrCacheMiss.
func (c *Client) Get(ctx context.Context, key string) (item Item, err error) {
	if d := c.direct; d != nil {
		// The near cache first, while the feeds keep it exact.
		var ticket nearTicket
		filling := false
		if d.near != nil {
			if d.coherent.Load() {
				now := time.Now()
				if a, ok := d.near.get(key, now); ok {
					d.nearHits.Add(1)
					if c.telemetry && trace.SpanFromContext(ctx).IsRecording() {
						// A span only inside a recorded trace: a hit costs
						// nanoseconds, a span a microsecond.
						_, span := c.opSpan(ctx, "Get")
						span.SetAttributes(attribute.String("ringcache.route", "near-cache"))
						endOpSpan(span, nil)
					}
					if !a.found {
						return Item{}, ErrCacheMiss
					}
					var ttl time.Duration
					if !a.expires.IsZero() {
						ttl = a.expires.Sub(now)
					}
					// A copy: the caller may change what it is given.
					return Item{Value: bytes.Clone(a.value), Version: a.version, TTL: ttl}, nil
				}
				// Taken before the read: a change seen meanwhile voids it.
				ticket, filling = d.near.ticket(key), true
			}
			d.nearMisses.Add(1)
		}
		// One CLIENT span for the op, wherever it is answered: the owner
		// node (which continues the trace) or the orchestrator.
		route := "orchestrator"
		if c.telemetry {
			var span trace.Span
			ctx, span = c.opSpan(ctx, "Get")
			defer func() {
				span.SetAttributes(attribute.String("ringcache.route", route))
				endOpSpan(span, err)
			}()
		}
		dctx, cancel := c.withTimeout(ctx)
		r, ok := c.directGet(dctx, key)
		cancel()
		if ok {
			route = "direct"
			if filling && d.coherent.Load() {
				now := time.Now()
				a := &nearAnswer{found: r.GetFound(), version: r.GetVersion(), value: bytes.Clone(r.GetValue())}
				if t := r.GetTtl(); t != nil {
					a.expires = now.Add(t.AsDuration())
				}
				d.near.fill(key, ticket, a, now)
			}
			if !r.GetFound() {
				return Item{}, ErrCacheMiss
			}
			return Item{Value: r.GetValue(), Version: r.GetVersion(), TTL: ttlOf(r.GetTtl())}, nil
		}
	}
	if c.pipelining() {
		resp, ok, err := c.piped(ctx, "Get", &pb.PipelineRequest{Op: &pb.PipelineRequest_Get{Get: &pb.GetRequest{Key: key}}}, true)
		if ok {
			if err != nil {
				return Item{}, err
			}
			r := resp.GetGet()
			if !r.GetFound() {
				return Item{}, ErrCacheMiss
			}
			return Item{Value: r.GetValue(), Version: r.GetVersion(), TTL: ttlOf(r.GetTtl())}, nil
		}
	}
	var r *pb.GetResponse
	err = c.do(ctx, true, func(ctx context.Context) (err error) {
		r, err = c.cache.Get(ctx, &pb.GetRequest{Key: key})
		return err
	})
	if err != nil {
		return Item{}, err
	}
	if !r.GetFound() {
		return Item{}, ErrCacheMiss
	}
	return Item{Value: r.GetValue(), Version: r.GetVersion(), TTL: ttlOf(r.GetTtl())}, nil
}

// Set writes value under key for ttl (0: no expiry) and answers the key's
// new version.
func (c *Client) Set(ctx context.Context, key string, value []byte, ttl time.Duration) (uint64, error) {
	req, err := setRequest(key, value, ttl)
	if err != nil {
		return 0, err
	}
	if r, ok, err := c.pipedSet(ctx, req); ok {
		return r.GetVersion(), err
	}
	var r *pb.SetResponse
	err = c.do(ctx, false, func(ctx context.Context) (err error) {
		r, err = c.cache.Set(ctx, req)
		c.noteMissed(req.GetKey(), r.GetMissed())
		return err
	})
	return r.GetVersion(), err
}

// pipedSet runs a Set on a pipeline; ok is false if pipelines are off.
func (c *Client) pipedSet(ctx context.Context, req *pb.SetRequest) (*pb.SetResponse, bool, error) {
	if !c.pipelining() {
		return nil, false, nil
	}
	resp, ok, err := c.piped(ctx, "Set", &pb.PipelineRequest{Op: &pb.PipelineRequest_Set{Set: req}}, false)
	c.noteMissed(req.GetKey(), resp.GetSet().GetMissed())
	return resp.GetSet(), ok, err
}

// pipedDelete runs a Delete on a pipeline; ok is false if pipelines are
// off.
func (c *Client) pipedDelete(ctx context.Context, req *pb.DeleteRequest) (*pb.DeleteResponse, bool, error) {
	if !c.pipelining() {
		return nil, false, nil
	}
	resp, ok, err := c.piped(ctx, "Delete", &pb.PipelineRequest{Op: &pb.PipelineRequest_Delete{Delete: req}}, false)
	c.noteMissed(req.GetKey(), resp.GetDelete().GetMissed())
	return resp.GetDelete(), ok, err
}

// SetIfAbsent writes value under key only if the key holds no live value;
// stored is false if it did. Never retried.
func (c *Client) SetIfAbsent(ctx context.Context, key string, value []byte, ttl time.Duration) (stored bool, version uint64, err error) {
	req, err := setRequest(key, value, ttl)
	if err != nil {
		return false, 0, err
	}
	req.Condition = &pb.SetRequest_IfAbsent{IfAbsent: true}
	if r, ok, err := c.pipedSet(ctx, req); ok {
		return r.GetStored(), r.GetVersion(), err
	}
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	r, err := c.cache.Set(ctx, req)
	c.noteMissed(req.GetKey(), r.GetMissed())
	return r.GetStored(), r.GetVersion(), err
}

// CompareAndSwap writes value under key only if the key's version is
// still version; stored is false (with the current version) if it is not.
// Never retried.
func (c *Client) CompareAndSwap(ctx context.Context, key string, value []byte, ttl time.Duration, version uint64) (stored bool, current uint64, err error) {
	if version == 0 {
		return false, 0, status.Error(codes.InvalidArgument, "ringcache: CompareAndSwap needs a version (0 is no version)")
	}
	req, err := setRequest(key, value, ttl)
	if err != nil {
		return false, 0, err
	}
	req.Condition = &pb.SetRequest_IfVersion{IfVersion: version}
	if r, ok, err := c.pipedSet(ctx, req); ok {
		return r.GetStored(), r.GetVersion(), err
	}
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	r, err := c.cache.Set(ctx, req)
	c.noteMissed(req.GetKey(), r.GetMissed())
	return r.GetStored(), r.GetVersion(), err
}

func setRequest(key string, value []byte, ttl time.Duration) (*pb.SetRequest, error) {
	t, err := ttlProto(ttl)
	if err != nil {
		return nil, err
	}
	return &pb.SetRequest{Key: key, Value: value, Ttl: t}, nil
}

// Delete removes key; deleted is false if it held no live value.
func (c *Client) Delete(ctx context.Context, key string) (deleted bool, err error) {
	if r, ok, err := c.pipedDelete(ctx, &pb.DeleteRequest{Key: key}); ok {
		return r.GetDeleted(), err
	}
	var r *pb.DeleteResponse
	err = c.do(ctx, false, func(ctx context.Context) (err error) {
		r, err = c.cache.Delete(ctx, &pb.DeleteRequest{Key: key})
		c.noteMissed(key, r.GetMissed())
		return err
	})
	return r.GetDeleted(), err
}

// CompareAndDelete removes key only if its version is still version.
// Never retried.
func (c *Client) CompareAndDelete(ctx context.Context, key string, version uint64) (deleted bool, err error) {
	if version == 0 {
		return false, status.Error(codes.InvalidArgument, "ringcache: CompareAndDelete needs a version (0 is no version)")
	}
	req := &pb.DeleteRequest{Key: key, IfVersion: version}
	if r, ok, err := c.pipedDelete(ctx, req); ok {
		return r.GetDeleted(), err
	}
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	r, err := c.cache.Delete(ctx, req)
	c.noteMissed(key, r.GetMissed())
	return r.GetDeleted(), err
}

// GetMany reads keys in one call and answers them in order. The error is
// for the call as a whole; each result carries its own (ErrCacheMiss for
// a miss).
func (c *Client) GetMany(ctx context.Context, keys []string) ([]GetResult, error) {
	var r *pb.GetManyResponse
	err := c.do(ctx, true, func(ctx context.Context) (err error) {
		r, err = c.cache.GetMany(ctx, &pb.GetManyRequest{Keys: keys})
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(r.GetResults()) != len(keys) {
		return nil, status.Errorf(codes.Internal, "ringcache: %d results for %d keys", len(r.GetResults()), len(keys))
	}
	out := make([]GetResult, len(keys))
	for i, res := range r.GetResults() {
		out[i].Key = keys[i]
		switch {
		case res.GetError() != nil:
			out[i].Err = keyError(res.GetError())
		case !res.GetFound():
			out[i].Err = ErrCacheMiss
		default:
			out[i].Item = Item{Value: res.GetValue(), Version: res.GetVersion(), TTL: ttlOf(res.GetTtl())}
		}
	}
	return out, nil
}

// SetMany writes entries in one call and answers them in order.
func (c *Client) SetMany(ctx context.Context, entries []Entry) ([]SetResult, error) {
	reqs := make([]*pb.SetRequest, len(entries))
	for i, e := range entries {
		req, err := setRequest(e.Key, e.Value, e.TTL)
		if err != nil {
			return nil, fmt.Errorf("entry %d (%q): %w", i, e.Key, err)
		}
		reqs[i] = req
	}
	var r *pb.SetManyResponse
	err := c.do(ctx, false, func(ctx context.Context) (err error) {
		r, err = c.cache.SetMany(ctx, &pb.SetManyRequest{Entries: reqs})
		return err
	})
	if err != nil {
		// Some entries may have been written.
		for _, e := range entries {
			c.noteMissed(e.Key, nil)
		}
		return nil, err
	}
	if len(r.GetResults()) != len(entries) {
		return nil, status.Errorf(codes.Internal, "ringcache: %d results for %d entries", len(r.GetResults()), len(entries))
	}
	out := make([]SetResult, len(entries))
	for i, res := range r.GetResults() {
		c.noteMissed(entries[i].Key, res.GetMissed())
		out[i] = SetResult{Key: entries[i].Key, Version: res.GetVersion(), Err: keyError(res.GetError())}
	}
	return out, nil
}
