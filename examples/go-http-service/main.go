// Command go-http-service is a small JSON HTTP API in Go that caches a
// read-heavy resource in ringcache: the hybrid ringcache was built for — a
// Go service handling HTTP, JSON and routing, calling a fast Rust cache
// over gRPC — with one trace from the HTTP request down to the cache node.
//
// Products live in a slow "database" it simulates (-source-delay per
// query). GET /products/{id} reads through the cache; PUT /products/{id}
// updates the database and then deletes the cached copy (delete-on-update);
// POST /products creates a product and writes it to the cache
// (write-through). See README.md for how reads and updates are kept from
// racing each other into a stale cache.
//
//	go run . -listen 127.0.0.1:8080 -ringcache 127.0.0.1:50051
//
// Tracing: OTEL_EXPORTER_OTLP_ENDPOINT (for example http://127.0.0.1:4317)
// turns on export over OTLP/gRPC; OTEL_SERVICE_NAME names the service
// (default go-http-service).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"

	ringcache "github.com/ringcache/ringcache/clients/go"
)

// Product is the resource served.
type Product struct {
	ID    string  `json:"id"`
	Name  string  `json:"name"`
	Price float64 `json:"price"`
	// Revision grows with every update of the product in the database.
	Revision uint64 `json:"revision"`
}

// database is the slow source of truth the cache sits in front of.
type database struct {
	mu       sync.Mutex
	delay    time.Duration
	products map[string]Product
}

var errNoProduct = errors.New("no such product")

// query takes the time a query takes, or until ctx ends.
func (d *database) query(ctx context.Context) error {
	t := time.NewTimer(d.delay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (d *database) get(ctx context.Context, id string) (Product, error) {
	if err := d.query(ctx); err != nil {
		return Product{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.products[id]
	if !ok {
		return Product{}, errNoProduct
	}
	return p, nil
}

func (d *database) put(ctx context.Context, p Product, create bool) (Product, error) {
	if err := d.query(ctx); err != nil {
		return Product{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	old, exists := d.products[p.ID]
	if !create && !exists {
		return Product{}, errNoProduct
	}
	p.Revision = old.Revision + 1
	d.products[p.ID] = p
	return p, nil
}

type server struct {
	db    *database
	cache *ringcache.Client
	ttl   time.Duration
	log   *slog.Logger
}

func cacheKey(id string) string { return "product:" + id }

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}

// cached is what the cache holds for a product: the product, or — after
// an update — a marker saying the cached copy is gone and which revision
// replaced it. A marker instead of a plain delete closes the classic
// read-through race: a reader that read the database before an update
// cannot put the old product back after the update removed it (its
// SetIfAbsent finds the marker, and its CompareAndSwap over a marker is
// refused once a newer marker replaced it).
type cached struct {
	Product *Product `json:"product,omitempty"`
	// UpdatedTo is set on a marker: the product's revision after the update.
	UpdatedTo uint64 `json:"updated_to,omitempty"`
}

// getProduct reads through the cache. On a miss it reads the database and
// fills the cache only if the key is still empty; over an update marker
// it fills only if the marker is unchanged (compare-and-swap on the
// marker's version) and the database is at least at the marker's
// revision.
func (s *server) getProduct(w http.ResponseWriter, r *http.Request) {
	ctx, id := r.Context(), r.PathValue("id")
	var marker *ringcache.Item
	item, err := s.cache.Get(ctx, cacheKey(id))
	switch {
	case err == nil:
		var c cached
		if json.Unmarshal(item.Value, &c) == nil && c.Product != nil {
			w.Header().Set("X-Cache", "hit")
			writeJSON(w, http.StatusOK, c.Product)
			return
		}
		marker = &item
	case errors.Is(err, ringcache.ErrCacheMiss):
	default:
		// The cache is an optimization: serve from the database.
		s.log.WarnContext(ctx, "cache read failed; reading the database", "id", id, "error", err)
	}
	p, err := s.db.get(ctx, id)
	if failedQuery(w, id, err) {
		return
	}
	body, _ := json.Marshal(cached{Product: &p})
	if marker == nil {
		_, _, err = s.cache.SetIfAbsent(ctx, cacheKey(id), body, s.ttl)
	} else {
		var m cached
		if json.Unmarshal(marker.Value, &m) == nil && p.Revision >= m.UpdatedTo {
			_, _, err = s.cache.CompareAndSwap(ctx, cacheKey(id), body, s.ttl, marker.Version)
		}
	}
	if err != nil {
		s.log.WarnContext(ctx, "cache fill failed", "id", id, "error", err)
	}
	w.Header().Set("X-Cache", "miss")
	writeJSON(w, http.StatusOK, p)
}

// failedQuery answers a database error (404 for a missing product, 503
// otherwise) and says whether there was one.
func failedQuery(w http.ResponseWriter, id string, err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, errNoProduct):
		fail(w, http.StatusNotFound, "no product "+id)
	default:
		fail(w, http.StatusServiceUnavailable, err.Error())
	}
	return true
}

func (s *server) readProduct(w http.ResponseWriter, r *http.Request) (Product, bool) {
	var p Product
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	if err := dec.Decode(&p); err != nil {
		fail(w, http.StatusBadRequest, "a JSON product is expected: "+err.Error())
		return p, false
	}
	return p, true
}

// putProduct updates the database, then deletes the cached copy by
// writing an update marker over it (see cached): the next read fills it
// from the database. A failed delete is an error — the client must not
// believe the update is visible when it may not be.
func (s *server) putProduct(w http.ResponseWriter, r *http.Request) {
	ctx, id := r.Context(), r.PathValue("id")
	p, ok := s.readProduct(w, r)
	if !ok {
		return
	}
	p.ID = id
	p, err := s.db.put(ctx, p, false)
	if failedQuery(w, id, err) {
		return
	}
	marker, _ := json.Marshal(cached{UpdatedTo: p.Revision})
	if _, err := s.cache.Set(ctx, cacheKey(id), marker, s.ttl); err != nil {
		fail(w, http.StatusServiceUnavailable, "updated, but the cached copy could not be removed: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, p)
}

// postProduct creates a product and writes it to the cache at once
// (write-through): the first read is a hit.
func (s *server) postProduct(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	p, ok := s.readProduct(w, r)
	if !ok {
		return
	}
	if p.ID == "" {
		fail(w, http.StatusBadRequest, "a product needs an id")
		return
	}
	p, err := s.db.put(ctx, p, true)
	if err != nil {
		fail(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	body, _ := json.Marshal(cached{Product: &p})
	if _, err := s.cache.Set(ctx, cacheKey(p.ID), body, s.ttl); err != nil {
		// Safe to continue: a miss reads the database.
		s.log.WarnContext(ctx, "write-through failed", "id", p.ID, "error", err)
	}
	writeJSON(w, http.StatusCreated, p)
}

// tracing exports spans over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is
// set, and propagates W3C trace context either way.
func tracing(ctx context.Context) (func(context.Context) error, error) {
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	if os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" && os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "" {
		return func(context.Context) error { return nil }, nil
	}
	exporter, err := otlptracegrpc.New(ctx)
	if err != nil {
		return nil, fmt.Errorf("OTLP exporter: %w", err)
	}
	name := os.Getenv("OTEL_SERVICE_NAME")
	if name == "" {
		name = "go-http-service"
	}
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(semconv.ServiceName(name)))
	if err != nil {
		return nil, err
	}
	// The batcher reads OTEL_BSP_SCHEDULE_DELAY and friends itself.
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	return tp.Shutdown, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "HTTP address to serve on")
	target := flag.String("ringcache", "127.0.0.1:50051", "the ringcache orchestrator (host:port)")
	delay := flag.Duration("source-delay", 50*time.Millisecond, "how long the simulated database takes per query")
	ttl := flag.Duration("ttl", 10*time.Minute, "TTL of cached products")
	cacheTimeout := flag.Duration("cache-timeout", 200*time.Millisecond, "deadline of each cache call (a slow cache must not hold a request)")
	drain := flag.Duration("drain", 10*time.Second, "on SIGTERM, how long requests in flight get to finish before the process exits")
	direct := flag.Bool("cache-direct", false, "read straight from each key's owner node (ringcache direct mode); the nodes' addresses must be reachable from here")
	nearBytes := flag.Uint64("near-cache-bytes", 0, "keep up to this many bytes of cache answers in this process, kept fresh by the nodes' change feeds (0: off; implies -cache-direct)")
	flag.Parse()
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	shutdown, err := tracing(ctx)
	if err != nil {
		log.Error("tracing", "error", err)
		os.Exit(1)
	}
	cache, err := ringcache.Dial(*target, ringcache.WithTimeout(*cacheTimeout),
		ringcache.WithDirect(*direct), ringcache.WithNearCache(*nearBytes))
	if err != nil {
		log.Error("ringcache", "error", err)
		os.Exit(1)
	}
	defer cache.Close()

	s := &server{
		db:    &database{delay: *delay, products: map[string]Product{}},
		cache: cache,
		ttl:   *ttl,
		log:   log,
	}
	mux := http.NewServeMux()
	// Each route names its SERVER span: "GET /products/{id}".
	route := func(pattern string, h http.HandlerFunc) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			span := trace.SpanFromContext(r.Context())
			span.SetName(pattern)
			span.SetAttributes(semconv.HTTPRoute(pattern[len(r.Method)+1:]))
			h(w, r)
		})
	}
	route("GET /products/{id}", s.getProduct)
	route("PUT /products/{id}", s.putProduct)
	route("POST /products", s.postProduct)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })

	srv := &http.Server{
		Addr: *listen,
		Handler: otelhttp.NewHandler(mux, "http.server",
			otelhttp.WithFilter(func(r *http.Request) bool { return r.URL.Path != "/healthz" })),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
	}
	// On SIGTERM: stop accepting, let the requests in flight finish (they
	// still use the cache client), and only then return — the deferred
	// cache.Close runs after every handler is done.
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		<-ctx.Done()
		c, cancel := context.WithTimeout(context.Background(), *drain)
		defer cancel()
		if err := srv.Shutdown(c); err != nil {
			log.Warn("requests still in flight at the end of the drain", "error", err)
		}
	}()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Error("listen", "error", err)
		os.Exit(1)
	}
	log.Info("serving", "listen", l.Addr().String(), "ringcache", *target)
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("serve", "error", err)
		os.Exit(1)
	}
	// Serve returns as soon as the shutdown starts; wait for the drain.
	<-drained
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = shutdown(c)
}
