package ringcache

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/ringcache/ringcache/clients/go/gen/ringcache/v1"
)

// Direct mode, as in the Rust client (clients/rust/src/direct.rs, where
// the design is explained at length): Get goes straight to the key's first
// owner, placed by the orchestrator's topology (Cluster/WatchTopology)
// with the same placement (placement.go, checked against the Rust
// vectors), only while that is as safe as a routed read — the owner
// healthy, not warming, not reading through, owing the key no update (the
// nodes' change feeds publish debts and their settlement), every feed of
// a node that is not ejected in sync, and the node agreeing on the
// topology's epoch. Otherwise, and whenever a direct read does not answer
// cleanly within half of its deadline, it goes through the orchestrator.
// Writes always go through the orchestrator.

const (
	// directEpochHeader carries the epoch a direct read was routed by.
	directEpochHeader = "ringcache-direct-epoch"
	// feedSilence: a feed silent this long is lost (nodes beat every second).
	feedSilence = 3 * time.Second
	// refreshCoolDown: stale-epoch refusals ask for the topology again at
	// most this often.
	refreshCoolDown = time.Second
	// provisional: how long a key this client's own write missed an owner
	// of stays off that owner before its debt shows on a feed.
	provisional = 5 * time.Second
	// maxMarks bounds the debt marks kept; beyond it an owner is skipped
	// for every key until its holders settle.
	maxMarks = 100_000
)

// WithDirect turns direct mode on (off by default): Get goes straight to
// the key's owner node when that is safe, everything else through the
// orchestrator. The nodes' addresses in the topology must be reachable
// from this process with the same dial options (TLS, token).
func WithDirect(on bool) Option {
	return func(o *options) { o.direct = on }
}

// DirectStats says where Gets went in direct mode.
type DirectStats struct {
	// Direct: answered by the owner node directly.
	Direct uint64
	// Routed: sent through the orchestrator because a direct read was not
	// safe (owner away or warming, an open debt, a feed not in sync, no
	// topology).
	Routed uint64
	// Fallbacks: direct reads that did not answer cleanly and were sent
	// through the orchestrator.
	Fallbacks uint64
	// StaleEpochs: direct reads a node refused because this client's
	// topology was stale.
	StaleEpochs uint64
}

type holderSeq struct {
	holder string
	seq    uint64
}

// ownerMarks are the debts one owner has, as far as this client knows.
type ownerMarks struct {
	keys           map[string][]holderSeq
	all            []holderSeq
	provisional    map[string]time.Time
	provisionalAll time.Time
}

type marks struct {
	mu     sync.RWMutex
	owners map[string]*ownerMarks
	keys   int
}

func (m *marks) owner(owner string) *ownerMarks {
	o := m.owners[owner]
	if o == nil {
		o = &ownerMarks{keys: map[string][]holderSeq{}, provisional: map[string]time.Time{}}
		m.owners[owner] = o
	}
	return o
}

// owe records a debt (key "" : every key of the owner).
func (m *marks) owe(owner, key, holder string, seq uint64) {
	o := m.owner(owner)
	if key != "" {
		delete(o.provisional, key)
	}
	if key != "" && m.keys < maxMarks {
		o.keys[key] = append(o.keys[key], holderSeq{holder, seq})
		m.keys++
		return
	}
	o.all = append(o.all, holderSeq{holder, seq})
}

// settle drops the holder's records of the owner through seq; true if an
// all-keys mark went (the holder must be listed again).
func (m *marks) settle(owner, holder string, through uint64) bool {
	o := m.owners[owner]
	if o == nil {
		return false
	}
	settled := func(h holderSeq) bool { return h.holder == holder && h.seq <= through }
	for key, hs := range o.keys {
		kept := hs[:0]
		for _, h := range hs {
			if !settled(h) {
				kept = append(kept, h)
			}
		}
		m.keys -= len(hs) - len(kept)
		if len(kept) == 0 {
			delete(o.keys, key)
		} else {
			o.keys[key] = kept
		}
	}
	before := len(o.all)
	kept := o.all[:0]
	for _, h := range o.all {
		if !settled(h) {
			kept = append(kept, h)
		}
	}
	o.all = kept
	if len(o.keys) == 0 && len(o.all) == 0 && len(o.provisional) == 0 {
		delete(m.owners, owner)
	}
	return len(kept) < before
}

// missed: this client's write of key missed owner (its answer said so).
func (m *marks) missed(owner, key string, now time.Time) {
	o := m.owner(owner)
	if _, ok := o.keys[key]; ok {
		return
	}
	if len(o.provisional) >= maxMarks {
		for k, t := range o.provisional {
			if now.Sub(t) >= provisional {
				delete(o.provisional, k)
			}
		}
	}
	if len(o.provisional) < maxMarks {
		o.provisional[key] = now
	} else {
		o.provisionalAll = now.Add(provisional)
	}
}

func (m *marks) clearOwner(owner string) {
	if o := m.owners[owner]; o != nil {
		for _, hs := range o.keys {
			m.keys -= len(hs)
		}
		delete(m.owners, owner)
	}
}

func (m *marks) blocks(owner, key string, now time.Time) bool {
	o := m.owners[owner]
	if o == nil {
		return false
	}
	if len(o.all) > 0 || now.Before(o.provisionalAll) {
		return true
	}
	if _, ok := o.keys[key]; ok {
		return true
	}
	t, ok := o.provisional[key]
	return ok && now.Sub(t) < provisional
}

type viewNode struct {
	id, address string
	readable    bool
	followed    bool
}

type view struct {
	epoch    string
	ring     *ring
	nodes    []viewNode
	handoff  bool
	replicas int
}

func viewOf(t *pb.Topology) *view {
	if t.GetPlacementVersion() != PlacementVersion || len(t.GetEpoch()) != 16 {
		return nil
	}
	ids := make([]string, 0, len(t.GetNodes()))
	for _, n := range t.GetNodes() {
		ids = append(ids, n.GetId())
	}
	r := newRing(ids)
	v := &view{epoch: t.GetEpoch(), ring: r, handoff: t.GetHandoff(), replicas: int(t.GetReplicas())}
	for _, id := range r.ids {
		var info *pb.NodeInfo
		for _, n := range t.GetNodes() {
			if n.GetId() == id {
				info = n
				break
			}
		}
		node := viewNode{id: id}
		if info != nil {
			node.address = info.GetAddress()
			node.readable = info.GetState() == pb.NodeState_NODE_STATE_HEALTHY && !info.GetWarming() && !info.GetReadsThrough()
			node.followed = info.GetState() != pb.NodeState_NODE_STATE_EJECTED && info.GetState() != pb.NodeState_NODE_STATE_NEVER_REACHED
		}
		v.nodes = append(v.nodes, node)
	}
	return v
}

// link is a node this client reads from and follows.
type link struct {
	id, address string
	conn        *grpc.ClientConn
	mu          sync.Mutex
	epoch       string
	pipes       []*pipe
	inSync      atomic.Bool
	relist      atomic.Bool
	cancel      context.CancelFunc
}

type direct struct {
	cluster   pb.ClusterClient
	dial      []grpc.DialOption
	pipelines int
	ctx       context.Context
	cancel    context.CancelFunc

	mu    sync.RWMutex
	view  *view
	links map[string]*link

	marks    marks
	coherent atomic.Bool

	refresh     chan struct{}
	refreshMu   sync.Mutex
	lastRefresh time.Time

	direct, routed, fallbacks, staleEpochs atomic.Uint64

	// near: the near cache (WithNearCache), nil when off.
	near                 *nearCache
	nearHits, nearMisses atomic.Uint64
}

func startDirect(conn *grpc.ClientConn, dial []grpc.DialOption, pipelines int, near *nearCache) *direct {
	ctx, cancel := context.WithCancel(context.Background())
	d := &direct{
		cluster: pb.NewClusterClient(conn), dial: dial, pipelines: max(pipelines, 1),
		ctx: ctx, cancel: cancel, links: map[string]*link{},
		marks:   marks{owners: map[string]*ownerMarks{}},
		refresh: make(chan struct{}, 1),
		near:    near,
	}
	go d.watch()
	return d
}

func (d *direct) close() {
	d.cancel()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, l := range d.links {
		l.cancel()
		_ = l.conn.Close()
	}
	d.links = map[string]*link{}
	if d.near != nil {
		d.near.close()
	}
}

// voidNode voids, in the near cache, the answers of keys whose changes
// node id may have published unseen: those it is among the first
// replicas + 1 nodes of (owners, and the stand-in that takes their writes
// while one is away). What a gap in its feed, its loss, restart or flush
// means.
func (d *direct) voidNode(id string) {
	if d.near == nil {
		return
	}
	d.mu.RLock()
	v := d.view
	d.mu.RUnlock()
	if v == nil {
		d.near.invalidateMatching(nil)
		return
	}
	index := -1
	for i, n := range v.nodes {
		if n.id == id {
			index = i
		}
	}
	if index < 0 {
		d.near.invalidateMatching(nil)
		return
	}
	reach := v.replicas + 1
	d.near.invalidateMatching(func(key string) bool {
		for _, o := range v.ring.owners(key, reach) {
			if o == index {
				return true
			}
		}
		return false
	})
}

// watch follows the topology for as long as the client lives.
func (d *direct) watch() {
	backoff := 50 * time.Millisecond
	for d.ctx.Err() == nil {
		ctx, cancel := context.WithCancel(d.ctx)
		stream, err := d.cluster.WatchTopology(ctx, &pb.WatchTopologyRequest{})
		if err == nil {
			go func() {
				select {
				case <-d.refresh:
					cancel() // a node said our epoch is stale: watch anew
				case <-ctx.Done():
				}
			}()
			for {
				t, err := stream.Recv()
				if err != nil {
					if status.Code(err) == codes.Unimplemented {
						cancel()
						return
					}
					break
				}
				backoff = 50 * time.Millisecond
				d.apply(t)
			}
		}
		cancel()
		d.mu.Lock()
		d.view = nil
		d.mu.Unlock()
		d.recompute()
		select {
		case <-d.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (d *direct) apply(t *pb.Topology) {
	v := viewOf(t)
	d.mu.Lock()
	changed := false
	if v != nil {
		for id, l := range d.links {
			keep := false
			for _, n := range v.nodes {
				if n.id == id && n.address == l.address {
					keep = true
				}
			}
			if !keep {
				l.cancel()
				_ = l.conn.Close()
				delete(d.links, id)
				changed = true
			}
		}
		for _, n := range v.nodes {
			if _, ok := d.links[n.id]; ok || n.address == "" {
				continue
			}
			conn, err := grpc.NewClient(n.address, d.dial...)
			if err != nil {
				continue
			}
			ctx, cancel := context.WithCancel(d.ctx)
			l := &link{id: n.id, address: n.address, conn: conn, cancel: cancel}
			l.relist.Store(true)
			d.links[n.id] = l
			changed = true
			go d.follow(ctx, l)
		}
		if changed {
			for _, l := range d.links {
				l.relist.Store(true)
			}
		}
	}
	d.view = v
	d.mu.Unlock()
	d.recompute()
}

// recompute keeps coherent: a view, and every followed node's feed in
// sync.
func (d *direct) recompute() {
	d.mu.RLock()
	defer d.mu.RUnlock()
	ok := d.view != nil
	if ok {
		for _, n := range d.view.nodes {
			if !n.followed {
				continue
			}
			if l := d.links[n.id]; l == nil || !l.inSync.Load() {
				ok = false
				break
			}
		}
	}
	d.coherent.Store(ok)
}

func (d *direct) setSync(l *link, inSync bool) {
	if l.inSync.Swap(inSync) != inSync {
		d.recompute()
	}
}

// listDebts lists every debt l's node records, for every owner of the
// view.
func (d *direct) listDebts(ctx context.Context, l *link) error {
	d.mu.RLock()
	var owners []string
	if d.view != nil {
		for _, n := range d.view.nodes {
			if n.id != l.id {
				owners = append(owners, n.id)
			}
		}
	}
	d.mu.RUnlock()
	internal := pb.NewInternalClient(l.conn)
	for _, owner := range owners {
		ask, cancel := context.WithTimeout(ctx, feedSilence)
		listed, err := internal.Debts(ask, &pb.DebtsRequest{Owner: owner})
		cancel()
		if err != nil {
			return err
		}
		d.marks.mu.Lock()
		if listed.GetOverflowed() || listed.GetMore() {
			d.marks.owe(owner, "", l.id, listed.GetThrough())
		}
		for _, key := range listed.GetKeys() {
			d.marks.owe(owner, key, l.id, listed.GetThrough())
		}
		d.marks.mu.Unlock()
	}
	return nil
}

// follow reads l's node's change feed for as long as ctx lives.
func (d *direct) follow(ctx context.Context, l *link) {
	internal := pb.NewInternalClient(l.conn)
	var incarnation, seq uint64
	following := false
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		sctx, cancel := context.WithCancel(ctx)
		silence := time.AfterFunc(feedSilence, cancel)
		stream, err := internal.Changes(sctx, &pb.ChangesRequest{Incarnation: incarnation, After: seq})
		for err == nil {
			var m *pb.ChangesResponse
			m, err = stream.Recv()
			if err != nil {
				break
			}
			silence.Reset(feedSilence)
			backoff = 50 * time.Millisecond
			restarted := following && m.GetIncarnation() != incarnation
			if restarted {
				// A new process: empty, it owes nothing any more.
				d.marks.mu.Lock()
				d.marks.clearOwner(l.id)
				d.marks.mu.Unlock()
			}
			if restarted || m.GetGap() {
				// Changes went unseen: what this node could have changed
				// is void.
				d.voidNode(l.id)
			}
			if !following || restarted || m.GetGap() {
				following, incarnation, seq = true, m.GetIncarnation(), m.GetHead()
				l.relist.Store(true)
			}
			if l.relist.Swap(false) {
				d.setSync(l, false)
				if e := d.listDebts(sctx, l); e != nil {
					l.relist.Store(true)
					err = e
					break
				}
			}
			flushed := false
			var ownersVoided []string
			d.marks.mu.Lock()
			for _, c := range m.GetChanges() {
				switch c.GetKind() {
				case pb.ChangeKind_CHANGE_KIND_OWED:
					d.marks.owe(c.GetOwner(), c.GetKey(), l.id, c.GetVersion())
					// A fill may have read the owner's old value between
					// the change and this record: void it.
					if d.near != nil {
						if c.GetKey() != "" {
							d.near.invalidate(c.GetKey())
						} else {
							ownersVoided = append(ownersVoided, c.GetOwner())
						}
					}
				case pb.ChangeKind_CHANGE_KIND_SETTLED:
					if d.marks.settle(c.GetOwner(), l.id, c.GetVersion()) {
						l.relist.Store(true)
					}
				case pb.ChangeKind_CHANGE_KIND_FLUSH:
					d.marks.clearOwner(l.id)
					flushed = true
				default:
					if d.near != nil {
						d.near.invalidate(c.GetKey())
					}
				}
				seq = c.GetSequence()
			}
			d.marks.mu.Unlock()
			if flushed {
				d.voidNode(l.id)
			}
			for _, owner := range ownersVoided {
				d.voidNode(owner)
			}
			d.setSync(l, seq >= m.GetHead() && !l.relist.Load())
		}
		silence.Stop()
		cancel()
		d.setSync(l, false)
		// Lost: what it changes from now on goes unseen until it is
		// followed again.
		d.voidNode(l.id)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// route answers the owner's link and pipes if key may be read directly
// now.
func (d *direct) route(key string) (*pipe, bool) {
	if !d.coherent.Load() {
		return nil, false
	}
	d.mu.RLock()
	v := d.view
	if v == nil || v.handoff {
		d.mu.RUnlock()
		return nil, false
	}
	owners := v.ring.owners(key, 1)
	if len(owners) == 0 || !v.nodes[owners[0]].readable {
		d.mu.RUnlock()
		return nil, false
	}
	node := v.nodes[owners[0]]
	l := d.links[node.id]
	epoch := v.epoch
	d.mu.RUnlock()
	if l == nil {
		return nil, false
	}
	d.marks.mu.RLock()
	blocked := d.marks.blocks(node.id, key, time.Now())
	d.marks.mu.RUnlock()
	if blocked {
		return nil, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.epoch != epoch || len(l.pipes) == 0 {
		l.epoch = epoch
		l.pipes = l.pipes[:0]
		md := metadata.Pairs(directEpochHeader, epoch)
		for range d.pipelines {
			l.pipes = append(l.pipes, &pipe{cache: pb.NewCacheClient(l.conn), md: md})
		}
	}
	return l.pipes[time.Now().UnixNano()%int64(len(l.pipes))], true
}

// missed records the owners this client's write of key missed.
func (d *direct) missed(key string, owners []string) {
	if len(owners) == 0 {
		return
	}
	now := time.Now()
	d.marks.mu.Lock()
	for _, o := range owners {
		d.marks.missed(o, key, now)
	}
	d.marks.mu.Unlock()
}

// refused looks at a direct read's error: a stale epoch asks for the
// topology again, at most once per cool-down.
func (d *direct) refused(e *pb.PipelineResponse) {
	st := e.GetError()
	if st == nil || codes.Code(st.GetCode()) != codes.FailedPrecondition {
		return
	}
	for _, detail := range st.GetDetails() {
		var info errdetails.ErrorInfo
		if detail.MessageIs(&info) && detail.UnmarshalTo(&info) == nil && info.GetReason() == "STALE_EPOCH" {
			d.staleEpochs.Add(1)
			d.refreshMu.Lock()
			if time.Since(d.lastRefresh) >= refreshCoolDown {
				d.lastRefresh = time.Now()
				select {
				case d.refresh <- struct{}{}:
				default:
				}
			}
			d.refreshMu.Unlock()
			return
		}
	}
}

// get tries key directly; ok is false when it was not answered cleanly
// (the caller reads through the orchestrator).
func (c *Client) directGet(ctx context.Context, key string) (*pb.GetResponse, bool) {
	d := c.direct
	p, ok := d.route(key)
	if !ok {
		d.routed.Add(1)
		return nil, false
	}
	budget := c.timeout / 2
	if deadline, has := ctx.Deadline(); has {
		budget = time.Until(deadline) / 2
	}
	if budget <= 0 {
		budget = 500 * time.Millisecond
	}
	dctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	req := &pb.PipelineRequest{Op: &pb.PipelineRequest_Get{Get: &pb.GetRequest{Key: key}}}
	if c.telemetry {
		inject(dctx, req)
	}
	if deadline, has := dctx.Deadline(); has {
		req.Timeout = durationpb.New(time.Until(deadline))
	}
	a := p.call(dctx, req)
	if a.how == answered {
		if a.resp.GetError() == nil {
			d.direct.Add(1)
			return a.resp.GetGet(), true
		}
		d.refused(a.resp)
	}
	d.fallbacks.Add(1)
	return nil, false
}

// DirectStats says where Gets went (zero without direct mode).
func (c *Client) DirectStats() DirectStats {
	if c.direct == nil {
		return DirectStats{}
	}
	d := c.direct
	return DirectStats{Direct: d.direct.Load(), Routed: d.routed.Load(), Fallbacks: d.fallbacks.Load(), StaleEpochs: d.staleEpochs.Load()}
}
