package ringcache

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/ringcache/ringcache/clients/go/gen/ringcache/v1"
)

// notRunTrailer marks a pipeline's clean end: the server answered every op
// it read, so the ops without an answer never ran.
const notRunTrailer = "ringcache-unanswered-not-run"

// pipelineMethod is the full name of the pipeline RPC; otelgrpc does not
// trace it (each op gets its own span instead).
const pipelineMethod = "/ringcache.v1.Cache/Pipeline"

// outcome says what became of a pipelined op.
type outcome int

const (
	// answered: the server's answer (possibly an error status) came.
	answered outcome = iota
	// notRun: the op provably never ran.
	notRun
	// lost: the connection was lost before the answer; the op may have run.
	lost
	// refused: the server refused the stream (a missing token, no such
	// method, ...): nothing ran, and sending it again would be refused too.
	refused
)

// refusal reports whether a stream's status is a refusal of the stream
// itself, which no retry changes.
func refusal(code codes.Code) bool {
	switch code {
	case codes.Unauthenticated, codes.PermissionDenied, codes.Unimplemented, codes.InvalidArgument, codes.FailedPrecondition:
		return true
	}
	return false
}

type pipeAnswer struct {
	resp *pb.PipelineResponse
	how  outcome
	err  error
}

// pipe is one Pipeline stream at a time, reopened after it ends.
type pipe struct {
	cache pb.CacheClient
	// md goes with every stream opened (a direct read's epoch).
	md metadata.MD
	// sendMu serializes Send (grpc-go streams allow one sender) and
	// opening the stream.
	sendMu  sync.Mutex
	current *pstream
}

// pstream is one open stream and the calls waiting for its answers.
type pstream struct {
	st     pb.Cache_PipelineClient
	cancel context.CancelFunc
	mu     sync.Mutex
	// failed: the stream has ended; nothing more is registered on it.
	failed  bool
	pending map[uint64]chan pipeAnswer
	nextID  uint64
}

// stream answers the open stream, opening one if there is none (under
// sendMu).
func (p *pipe) stream() (*pstream, error) {
	if ps := p.current; ps != nil {
		ps.mu.Lock()
		failed := ps.failed
		ps.mu.Unlock()
		if !failed {
			return ps, nil
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	if p.md != nil {
		ctx = metadata.NewOutgoingContext(ctx, p.md)
	}
	st, err := p.cache.Pipeline(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	ps := &pstream{st: st, cancel: cancel, pending: make(map[uint64]chan pipeAnswer)}
	p.current = ps
	go ps.receive()
	return ps, nil
}

// receive hands each answer to the call waiting for it; when the stream
// ends, it fails the calls still waiting: as never run if the server
// ended it cleanly, else as lost.
func (ps *pstream) receive() {
	for {
		resp, err := ps.st.Recv()
		if err != nil {
			how := lost
			switch {
			case len(ps.st.Trailer().Get(notRunTrailer)) > 0:
				how = notRun
			case refusal(status.Code(err)):
				how = refused
			}
			fail := status.Convert(err)
			if how == lost {
				fail = status.Newf(codes.Unavailable, "ringcache: the connection was lost before the answer came, so the call may have run: %s", fail.Message())
			}
			ps.cancel()
			ps.mu.Lock()
			ps.failed = true
			waiting := ps.pending
			ps.pending = nil
			ps.mu.Unlock()
			for _, ch := range waiting {
				ch <- pipeAnswer{how: how, err: fail.Err()}
			}
			return
		}
		ps.mu.Lock()
		ch := ps.pending[resp.GetId()]
		delete(ps.pending, resp.GetId())
		ps.mu.Unlock()
		if ch != nil {
			ch <- pipeAnswer{resp: resp, how: answered}
		}
	}
}

// call sends req on the pipe and waits for its answer or ctx.
func (p *pipe) call(ctx context.Context, req *pb.PipelineRequest) pipeAnswer {
	ch := make(chan pipeAnswer, 1)
	p.sendMu.Lock()
	ps, err := p.stream()
	if err != nil {
		p.sendMu.Unlock()
		return pipeAnswer{how: notRun, err: err}
	}
	ps.mu.Lock()
	if ps.failed {
		ps.mu.Unlock()
		p.sendMu.Unlock()
		return pipeAnswer{how: notRun, err: status.Error(codes.Unavailable, "ringcache: the pipeline ended before the call was sent")}
	}
	ps.nextID++
	id := ps.nextID
	ps.pending[id] = ch
	ps.mu.Unlock()
	req.Id = id
	err = ps.st.Send(req)
	p.sendMu.Unlock()
	if err != nil {
		// Not sent: the stream has ended (receive fails what was sent).
		ps.mu.Lock()
		_, waiting := ps.pending[id]
		delete(ps.pending, id)
		ps.mu.Unlock()
		if waiting {
			return pipeAnswer{how: notRun, err: status.Error(codes.Unavailable, "ringcache: the pipeline ended before the call was sent")}
		}
	}
	select {
	case a := <-ch:
		return a
	case <-ctx.Done():
		ps.mu.Lock()
		delete(ps.pending, id)
		ps.mu.Unlock()
		return pipeAnswer{how: lost, err: status.FromContextError(ctx.Err()).Err()}
	}
}

var tracer = otel.Tracer("github.com/ringcache/ringcache/clients/go")

// piped runs op on one of the client's pipelines, sending it again where
// that is safe (see the package documentation), within ctx. read: the op
// only reads, so it may run twice. ok is false when the server has no
// Pipeline (the caller then uses the unary call).
func (c *Client) piped(ctx context.Context, method string, req *pb.PipelineRequest, read bool) (resp *pb.PipelineResponse, ok bool, err error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	if !c.telemetry {
		return c.pipedUntraced(ctx, req, read)
	}
	if ctx.Value(spannedKey{}) == nil {
		var span trace.Span
		ctx, span = c.opSpan(ctx, method)
		defer func() { endOpSpan(span, err) }()
	}
	inject(ctx, req)
	return c.pipedUntraced(ctx, req, read)
}

// spannedKey marks a context whose call already has its op span (a direct
// Get that fell back to the orchestrator): piped adds none of its own.
type spannedKey struct{}

// opSpan starts the CLIENT span of one op, following the RPC conventions
// otelgrpc follows for unary calls.
func (c *Client) opSpan(ctx context.Context, method string) (context.Context, trace.Span) {
	ctx, span := tracer.Start(ctx, "ringcache.v1.Cache/"+method,
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("rpc.system.name", "grpc"),
			attribute.String("rpc.method", "ringcache.v1.Cache/"+method),
		))
	return context.WithValue(ctx, spannedKey{}, true), span
}

func endOpSpan(span trace.Span, err error) {
	code := status.Code(err)
	if errors.Is(err, ErrCacheMiss) {
		code = codes.OK
	}
	span.SetAttributes(attribute.String("rpc.response.status_code", canonical(code)))
	if code != codes.OK {
		span.SetStatus(otelcodes.Error, err.Error())
	}
	span.End()
}

// inject puts ctx's trace context on req: the server continues it.
func inject(ctx context.Context, req *pb.PipelineRequest) {
	carrier := propagation.MapCarrier{}
	otel.GetTextMapPropagator().Inject(ctx, carrier)
	req.Traceparent = carrier["traceparent"]
	req.Tracestate = carrier["tracestate"]
}

// pipedUntraced is piped without its span.
func (c *Client) pipedUntraced(ctx context.Context, req *pb.PipelineRequest, read bool) (resp *pb.PipelineResponse, ok bool, err error) {
	backoff := c.retry.Backoff
	for attempt := 1; ; attempt++ {
		if deadline, has := ctx.Deadline(); has {
			req.Timeout = durationpb.New(time.Until(deadline))
		}
		p := c.pipes[c.nextPipe.Add(1)%uint64(len(c.pipes))]
		a := p.call(ctx, req)
		retry := false
		switch a.how {
		case answered:
			e := a.resp.GetError()
			if e == nil {
				return a.resp, true, nil
			}
			// With its details: they say what kind of refusal it is.
			err = status.FromProto(e).Err()
			retry = shed(err)
		case refused:
			if status.Code(a.err) == codes.Unimplemented {
				c.noPipeline.Store(true)
				return nil, false, nil
			}
			err = a.err
		case notRun:
			if refusal(status.Code(a.err)) {
				// Refused when the stream was opened.
				if status.Code(a.err) == codes.Unimplemented {
					c.noPipeline.Store(true)
					return nil, false, nil
				}
				return nil, true, a.err
			}
			err, retry = a.err, true
		case lost:
			err, retry = a.err, read
		}
		if !retry || attempt >= c.retry.Attempts || ctx.Err() != nil {
			return nil, true, err
		}
		wait := time.Duration(0)
		if backoff > 0 {
			wait = time.Duration(rand.Int64N(int64(backoff)))
		}
		if deadline, has := ctx.Deadline(); has && time.Until(deadline) <= wait {
			return nil, true, err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, true, err
		case <-t.C:
		}
		backoff *= 2
		if c.retry.MaxBackoff > 0 && backoff > c.retry.MaxBackoff {
			backoff = c.retry.MaxBackoff
		}
	}
}

// canonical is a code's name as the RPC conventions write it
// (INVALID_ARGUMENT).
func canonical(code codes.Code) string {
	name := code.String()
	if code == codes.Canceled {
		return "CANCELLED"
	}
	var b strings.Builder
	lower := false
	for _, r := range name {
		upper := r >= 'A' && r <= 'Z'
		if upper && lower {
			b.WriteByte('_')
		}
		lower = !upper
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}

// pipelining reports whether single-key calls go on pipelines.
func (c *Client) pipelining() bool {
	return len(c.pipes) > 0 && !c.noPipeline.Load()
}
