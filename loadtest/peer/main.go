// gcp-peer: a peer xDS control plane built on Envoy's go-control-plane, used by
// Tributary's load-test harness as a side-by-side baseline.
//
// xDS: go-control-plane server/v3 (SotW + Delta, ADS and per-type services) over
// a MuxCache that routes by type URL to one LinearCache per type. Every node sees
// the same named resources; clients subscribe by name (or wildcard for LDS/CDS).
//
// Control API (HTTP/1.1 JSON):
//
//	POST /resources {"type":"CDS|EDS|LDS|RDS","upsert":{"name":"<b64 proto>"},"delete":["name"]}
//	     -> 200 {"ok":true,"version":"N"} after ONE LinearCache.UpdateResources call
//	GET  /healthz
//	GET  /stats
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	endpointservice "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	routeservice "github.com/envoyproxy/go-control-plane/envoy/service/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// xdsType describes one served resource type.
type xdsType struct {
	short   string // CDS, EDS, LDS, RDS
	typeURL string
	newMsg  func() proto.Message
	nameOf  func(proto.Message) string
	cache   *cachev3.LinearCache

	mu      sync.Mutex // serialises updates so the version we report is the cache's
	version uint64
}

func (t *xdsType) versionString() string { return strconv.FormatUint(t.version, 10) }

var served = []*xdsType{
	{short: "CDS", typeURL: resourcev3.ClusterType,
		newMsg: func() proto.Message { return &clusterv3.Cluster{} },
		nameOf: func(m proto.Message) string { return m.(*clusterv3.Cluster).GetName() }},
	{short: "EDS", typeURL: resourcev3.EndpointType,
		newMsg: func() proto.Message { return &endpointv3.ClusterLoadAssignment{} },
		nameOf: func(m proto.Message) string { return m.(*endpointv3.ClusterLoadAssignment).GetClusterName() }},
	{short: "LDS", typeURL: resourcev3.ListenerType,
		newMsg: func() proto.Message { return &listenerv3.Listener{} },
		nameOf: func(m proto.Message) string { return m.(*listenerv3.Listener).GetName() }},
	{short: "RDS", typeURL: resourcev3.RouteType,
		newMsg: func() proto.Message { return &routev3.RouteConfiguration{} },
		nameOf: func(m proto.Message) string { return m.(*routev3.RouteConfiguration).GetName() }},
}

// Types we do not manage but keep an (always empty) LinearCache for, so that a
// client asking for them on the ADS stream does not get the whole stream torn
// down by MuxCache ("no cache defined for key").
var emptyTypes = []string{
	resourcev3.ScopedRouteType,
	resourcev3.VirtualHostType,
	resourcev3.SecretType,
	resourcev3.RuntimeType,
	resourcev3.ExtensionConfigType,
}

func lookupType(s string) *xdsType {
	for _, t := range served {
		if s == t.short || s == t.typeURL {
			return t
		}
	}
	return nil
}

// stats are updated from the (synchronous) server callbacks; keep them cheap.
type stats struct {
	sotwOpen, deltaOpen       atomic.Int64
	sotwTotal, deltaTotal     atomic.Int64
	sotwReqs, deltaReqs       atomic.Int64
	sotwResps, deltaResps     atomic.Int64
	sotwNacks, deltaNacks     atomic.Int64
	sotwResSent, deltaResSent atomic.Int64 // resources carried in responses
	deltaRemovedSent          atomic.Int64
	updates                   atomic.Int64 // POST /resources applied
}

func (s *stats) callbacks() serverv3.Callbacks {
	return serverv3.CallbackFuncs{
		StreamOpenFunc: func(context.Context, int64, string) error {
			s.sotwOpen.Add(1)
			s.sotwTotal.Add(1)
			return nil
		},
		StreamClosedFunc: func(int64, *corev3.Node) { s.sotwOpen.Add(-1) },
		DeltaStreamOpenFunc: func(context.Context, int64, string) error {
			s.deltaOpen.Add(1)
			s.deltaTotal.Add(1)
			return nil
		},
		DeltaStreamClosedFunc: func(int64, *corev3.Node) { s.deltaOpen.Add(-1) },
		StreamRequestFunc: func(_ int64, r *discoverygrpc.DiscoveryRequest) error {
			s.sotwReqs.Add(1)
			if r.GetErrorDetail() != nil {
				s.sotwNacks.Add(1)
			}
			return nil
		},
		StreamResponseFunc: func(_ context.Context, _ int64, _ *discoverygrpc.DiscoveryRequest, r *discoverygrpc.DiscoveryResponse) {
			s.sotwResps.Add(1)
			s.sotwResSent.Add(int64(len(r.GetResources())))
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoverygrpc.DeltaDiscoveryRequest) error {
			s.deltaReqs.Add(1)
			if r.GetErrorDetail() != nil {
				s.deltaNacks.Add(1)
			}
			return nil
		},
		StreamDeltaResponseFunc: func(_ int64, _ *discoverygrpc.DeltaDiscoveryRequest, r *discoverygrpc.DeltaDiscoveryResponse) {
			s.deltaResps.Add(1)
			s.deltaResSent.Add(int64(len(r.GetResources())))
			s.deltaRemovedSent.Add(int64(len(r.GetRemovedResources())))
		},
	}
}

// ---- control API ----------------------------------------------------------

type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &httpError{code: http.StatusBadRequest, msg: fmt.Sprintf(format, a...)}
}

type rawUpsert struct {
	name string
	data []byte
}

// decodeResourcesBody walks the JSON body token by token so that a body of
// tens of MB is never held as one big Go value tree; only the decoded proto
// bytes are kept.
func decodeResourcesBody(r io.Reader) (typ string, upserts []rawUpsert, deletes []string, err error) {
	dec := json.NewDecoder(r)
	if err = expectDelim(dec, '{', "request body"); err != nil {
		return
	}
	seen := map[string]bool{}
	for dec.More() {
		var key string
		if key, err = stringToken(dec, "object key"); err != nil {
			return
		}
		if seen[key] {
			err = badRequest("duplicate field %q", key)
			return
		}
		seen[key] = true
		switch key {
		case "type":
			if typ, err = stringToken(dec, `"type"`); err != nil {
				return
			}
		case "upsert":
			var isNull bool
			if isNull, err = expectDelimOrNull(dec, '{', `"upsert"`); err != nil || isNull {
				if err != nil {
					return
				}
				continue
			}
			names := map[string]bool{}
			for dec.More() {
				var name, b64 string
				if name, err = stringToken(dec, `"upsert" key`); err != nil {
					return
				}
				if b64, err = stringToken(dec, fmt.Sprintf("upsert[%q]", name)); err != nil {
					return
				}
				if names[name] {
					err = badRequest("upsert[%q]: duplicate name", name)
					return
				}
				names[name] = true
				data, derr := base64.StdEncoding.DecodeString(b64)
				if derr != nil {
					// Be lenient about URL-safe / unpadded encodings.
					var derr2 error
					if data, derr2 = base64.RawStdEncoding.DecodeString(b64); derr2 != nil {
						if data, derr2 = base64.URLEncoding.DecodeString(b64); derr2 != nil {
							if data, derr2 = base64.RawURLEncoding.DecodeString(b64); derr2 != nil {
								err = badRequest("upsert[%q]: bad base64: %v", name, derr)
								return
							}
						}
					}
				}
				upserts = append(upserts, rawUpsert{name: name, data: data})
			}
			if err = expectDelim(dec, '}', `end of "upsert"`); err != nil {
				return
			}
		case "delete":
			var isNull bool
			if isNull, err = expectDelimOrNull(dec, '[', `"delete"`); err != nil || isNull {
				if err != nil {
					return
				}
				continue
			}
			for dec.More() {
				var name string
				if name, err = stringToken(dec, `"delete" element`); err != nil {
					return
				}
				deletes = append(deletes, name)
			}
			if err = expectDelim(dec, ']', `end of "delete"`); err != nil {
				return
			}
		default:
			err = badRequest("unknown field %q (expected type, upsert, delete)", key)
			return
		}
	}
	if err = expectDelim(dec, '}', "end of request body"); err != nil {
		return
	}
	if _, terr := dec.Token(); terr != io.EOF {
		err = badRequest("trailing data after JSON object")
		return
	}
	if !seen["type"] {
		err = badRequest(`missing "type" (CDS, EDS, LDS or RDS)`)
	}
	return
}

func tokenErr(err error, what string) error {
	if err == io.EOF {
		return badRequest("invalid JSON: unexpected end of body reading %s", what)
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return &httpError{code: http.StatusRequestEntityTooLarge, msg: err.Error()}
	}
	return badRequest("invalid JSON reading %s: %v", what, err)
}

// expectDelimOrNull accepts the opening delimiter d or a JSON null.
func expectDelimOrNull(dec *json.Decoder, d json.Delim, what string) (isNull bool, err error) {
	tok, err := dec.Token()
	if err != nil {
		return false, tokenErr(err, what)
	}
	if tok == nil {
		return true, nil
	}
	if got, ok := tok.(json.Delim); !ok || got != d {
		return false, badRequest("invalid JSON: expected %q or null at %s, got %v", string(d), what, tok)
	}
	return false, nil
}

func expectDelim(dec *json.Decoder, d json.Delim, what string) error {
	tok, err := dec.Token()
	if err != nil {
		return tokenErr(err, what)
	}
	if got, ok := tok.(json.Delim); !ok || got != d {
		return badRequest("invalid JSON: expected %q at %s, got %v", string(d), what, tok)
	}
	return nil
}

func stringToken(dec *json.Decoder, what string) (string, error) {
	tok, err := dec.Token()
	if err != nil {
		return "", tokenErr(err, what)
	}
	s, ok := tok.(string)
	if !ok {
		return "", badRequest("invalid JSON: expected a string for %s, got %v", what, tok)
	}
	return s, nil
}

func (s *stats) handleResources(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeJSON(w, http.StatusMethodNotAllowed, map[string]any{"ok": false, "error": "use POST"})
		return
	}
	version, err := s.applyResources(r.Body)
	if err != nil {
		code := http.StatusInternalServerError
		var he *httpError
		if errors.As(err, &he) {
			code = he.code
		}
		if code >= 500 {
			log.Printf("POST /resources: %v", err)
		}
		writeJSON(w, code, map[string]any{"ok": false, "error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ok": true, "version": version})
}

func (s *stats) applyResources(body io.Reader) (string, error) {
	typName, raws, deletes, err := decodeResourcesBody(body)
	if err != nil {
		return "", err
	}
	t := lookupType(typName)
	if t == nil {
		return "", badRequest("unknown type %q (expected CDS, EDS, LDS or RDS)", typName)
	}
	upserts := make(map[string]types.Resource, len(raws))
	for _, u := range raws {
		msg := t.newMsg()
		if err := proto.Unmarshal(u.data, msg); err != nil {
			return "", badRequest("upsert[%q]: bad %s proto: %v", u.name, t.short, err)
		}
		if got := t.nameOf(msg); got != u.name {
			return "", badRequest("upsert[%q]: resource name in the %s proto is %q, must equal the key", u.name, t.short, got)
		}
		upserts[u.name] = msg
	}
	raws = nil

	t.mu.Lock()
	defer t.mu.Unlock()
	if len(upserts) == 0 && len(deletes) == 0 {
		return t.versionString(), nil
	}
	// One cache update for the whole batch: watches are notified once.
	// LinearCache bumps its own version by one per call; t.version mirrors it.
	err = t.cache.UpdateResources(upserts, deletes)
	t.version++
	s.updates.Add(1)
	if err != nil {
		return "", fmt.Errorf("%s cache update: %w", t.short, err)
	}
	return t.versionString(), nil
}

func (s *stats) handleStats(w http.ResponseWriter, _ *http.Request) {
	resources := map[string]int{}
	versions := map[string]string{}
	wildcard := map[string]int{}
	for _, t := range served {
		resources[t.short] = t.cache.NumResources()
		// NumCacheWatches is not used: in v0.14.0 it is decremented twice for a
		// triggered watch and goes negative. The wildcard map size is exact.
		wildcard[t.short] = t.cache.NumWildcardWatches()
		t.mu.Lock()
		versions[t.short] = t.versionString()
		t.mu.Unlock()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	writeJSON(w, http.StatusOK, map[string]any{
		"resources":              resources,
		"versions":               versions,
		"wildcard_watches":       wildcard,
		"streams_open":           s.sotwOpen.Load() + s.deltaOpen.Load(),
		"sotw_streams_open":      s.sotwOpen.Load(),
		"delta_streams_open":     s.deltaOpen.Load(),
		"sotw_streams_total":     s.sotwTotal.Load(),
		"delta_streams_total":    s.deltaTotal.Load(),
		"requests":               s.sotwReqs.Load() + s.deltaReqs.Load(),
		"sotw_requests":          s.sotwReqs.Load(),
		"delta_requests":         s.deltaReqs.Load(),
		"responses":              s.sotwResps.Load() + s.deltaResps.Load(),
		"sotw_responses":         s.sotwResps.Load(),
		"delta_responses":        s.deltaResps.Load(),
		"nacks":                  s.sotwNacks.Load() + s.deltaNacks.Load(),
		"sotw_resources_sent":    s.sotwResSent.Load(),
		"delta_resources_sent":   s.deltaResSent.Load(),
		"delta_removed_sent":     s.deltaRemovedSent.Load(),
		"control_updates":        s.updates.Load(),
		"go_heap_alloc_bytes":    ms.HeapAlloc,
		"go_sys_bytes":           ms.Sys,
		"go_goroutines":          runtime.NumGoroutine(),
		"go_gc_cycles":           ms.NumGC,
		"go_gc_pause_total_nsec": ms.PauseTotalNs,
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeReadyFile(path, xdsAddr, controlAddr string) error {
	b, err := json.Marshal(map[string]string{"xds": xdsAddr, "control": controlAddr})
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	if _, err = tmp.Write(append(b, '\n')); err == nil {
		err = tmp.Close()
	} else {
		tmp.Close()
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

func main() {
	xdsAddr := flag.String("xds", "127.0.0.1:0", "gRPC xDS listen address (host:port, e.g. [::1]:0)")
	controlAddr := flag.String("control", "127.0.0.1:0", "HTTP control API listen address")
	readyFile := flag.String("ready-file", "", `once listening, write {"xds":..,"control":..} here (temp + rename)`)
	maxBody := flag.Int64("max-body", 1<<30, "max POST /resources body size in bytes")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("gcp-peer: ")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Caches: one LinearCache per type, muxed by type URL.
	caches := map[string]cachev3.Cache{}
	for _, t := range served {
		t.cache = cachev3.NewLinearCache(t.typeURL)
		caches[t.typeURL] = t.cache
	}
	for _, u := range emptyTypes {
		caches[u] = cachev3.NewLinearCache(u)
	}
	mux := &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        caches,
	}

	st := &stats{}
	xdsServer := serverv3.NewServer(ctx, mux, st.callbacks())

	grpcServer := grpc.NewServer(
		grpc.MaxConcurrentStreams(100000),
		grpc.MaxRecvMsgSize(64<<20),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    30 * time.Second,
			Timeout: 10 * time.Second,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             5 * time.Second,
			PermitWithoutStream: true,
		}),
	)
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(grpcServer, xdsServer)
	clusterservice.RegisterClusterDiscoveryServiceServer(grpcServer, xdsServer)
	endpointservice.RegisterEndpointDiscoveryServiceServer(grpcServer, xdsServer)
	listenerservice.RegisterListenerDiscoveryServiceServer(grpcServer, xdsServer)
	routeservice.RegisterRouteDiscoveryServiceServer(grpcServer, xdsServer)

	xdsLis, err := net.Listen("tcp", *xdsAddr)
	if err != nil {
		log.Fatalf("listen xds %s: %v", *xdsAddr, err)
	}
	ctlLis, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		log.Fatalf("listen control %s: %v", *controlAddr, err)
	}

	httpMux := http.NewServeMux()
	httpMux.HandleFunc("/resources", func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, *maxBody)
		st.handleResources(w, r)
	})
	httpMux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"ok": true})
	})
	httpMux.HandleFunc("/stats", st.handleStats)
	httpServer := &http.Server{Handler: httpMux, ReadHeaderTimeout: 10 * time.Second}

	errc := make(chan error, 2)
	go func() { errc <- fmt.Errorf("grpc: %w", grpcServer.Serve(xdsLis)) }()
	go func() {
		if err := httpServer.Serve(ctlLis); !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("http: %w", err)
		}
	}()

	if *readyFile != "" {
		if err := writeReadyFile(*readyFile, xdsLis.Addr().String(), ctlLis.Addr().String()); err != nil {
			log.Fatalf("ready file: %v", err)
		}
	}
	log.Printf("listening xds=%s control=%s (go-control-plane %s, pid %d)",
		xdsLis.Addr(), ctlLis.Addr(), gcpVersion(), os.Getpid())

	exitCode := 0
	select {
	case <-ctx.Done():
		log.Printf("signal received, shutting down")
	case err := <-errc:
		log.Printf("server error: %v", err)
		exitCode = 1
	}
	stop()

	shCtx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = httpServer.Shutdown(shCtx)
	// xDS streams never end on their own; GracefulStop would wait for clients.
	// Give it a moment, then force.
	done := make(chan struct{})
	go func() { grpcServer.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Second):
		grpcServer.Stop()
	}
	os.Exit(exitCode)
}

func gcpVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/envoyproxy/go-control-plane" {
				return d.Version
			}
		}
	}
	return "unknown"
}
