// gcp-peer: a peer xDS control plane built on Envoy's go-control-plane, used by
// Tributary's load-test harness as a side-by-side baseline.
//
// xDS: go-control-plane server/v3 (SotW + Delta, ADS and per-type services) over
// LinearCaches, built as a competent go-control-plane user would for scoped sidecars:
// EDS and RDS (asked for by name) have one shared cache each; CDS has one cache per
// sidecar scope (a scoped sidecar's wildcard CDS is its scope's clusters) plus one
// with every cluster (gateways, unscoped sidecars); LDS has one cache per role and
// scope (a scoped sidecar's listeners, whose route tables hold only its scope's
// services; the unscoped sidecars' listeners; each gateway's listeners). A router picks the cache by type URL
// and node metadata (tributary.io/sidecar, tributary.io/gateway), as the hub does.
//
// Control API: gRPC PeerControl.Update (control.proto): resources as encoded
// protobuf, and the groups (scopes, roles) that select them on a wildcard.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tributary.test/gcppeer/controlpb"
)

// xdsType describes one served resource type.
type xdsType struct {
	short   string // CDS, EDS, LDS, RDS
	typeURL string
	newMsg  func() proto.Message
	nameOf  func(proto.Message) string

	mu      sync.Mutex // serialises updates of this type's caches
	version uint64     // updates applied
}

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

// Types we do not manage but answer from an (always empty) LinearCache, so that a
// client asking for them on the ADS stream does not get the whole stream torn down.
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

func (s *stats) summary() string {
	return fmt.Sprintf("streams sotw=%d delta=%d; requests sotw=%d delta=%d; responses sotw=%d delta=%d; nacks sotw=%d delta=%d; resources sent sotw=%d delta=%d, removed %d; control updates %d",
		s.sotwTotal.Load(), s.deltaTotal.Load(), s.sotwReqs.Load(), s.deltaReqs.Load(),
		s.sotwResps.Load(), s.deltaResps.Load(), s.sotwNacks.Load(), s.deltaNacks.Load(),
		s.sotwResSent.Load(), s.deltaResSent.Load(), s.deltaRemovedSent.Load(), s.updates.Load())
}

// ---- caches: what a go-control-plane user builds for scoped sidecars ------

// group is one LinearCache serving a class of nodes on a wildcard subscription
// (a sidecar scope's clusters, a role's listeners), holding the named members.
type group struct {
	cache   *cachev3.LinearCache
	members map[string]bool
}

// typeCaches are the caches of one served type. EDS and RDS (always asked for by
// name) have one shared cache; CDS and LDS also have one cache per group, so that
// a scoped sidecar's wildcard CDS is its scope's clusters and a sidecar's wildcard
// LDS is the sidecar listeners (not the API listeners, not a gateway's), as the hub
// serves them.
type typeCaches struct {
	*xdsType
	all    *cachev3.LinearCache
	mu     sync.RWMutex // guards groups and resources; updates are serialised by xdsType.mu
	groups map[string]*group
	// The current resources, so that a group defined later starts with its members.
	resources map[string]types.Resource
}

// cacheFor picks the cache a request is served from. Node metadata is on the first
// request of a stream; the server copies it into every later request.
func (t *typeCaches) cacheFor(node *corev3.Node) cachev3.Cache {
	key := ""
	fields := node.GetMetadata().GetFields()
	gw := fields["tributary.io/gateway"].GetStringValue()
	switch t.short {
	case "CDS":
		if scope := fields["tributary.io/sidecar"].GetStringValue(); gw == "" && scope != "" {
			key = "scope:" + scope
		}
	case "LDS":
		if gw != "" {
			key = "gateway:" + gw
		} else if scope := fields["tributary.io/sidecar"].GetStringValue(); scope != "" {
			key = "scope:" + scope
		} else {
			key = "sidecar"
		}
	}
	if key == "" {
		return t.all
	}
	t.mu.RLock()
	g := t.groups[key]
	t.mu.RUnlock()
	if g == nil {
		// Like the hub: an unknown scope or role receives nothing, never everything.
		return emptyCache(t.typeURL)
	}
	return g.cache
}

var (
	emptyMu     sync.Mutex
	emptyCaches = map[string]*cachev3.LinearCache{}
)

func emptyCache(typeURL string) *cachev3.LinearCache {
	emptyMu.Lock()
	defer emptyMu.Unlock()
	c := emptyCaches[typeURL]
	if c == nil {
		c = cachev3.NewLinearCache(typeURL)
		emptyCaches[typeURL] = c
	}
	return c
}

// router implements cachev3.Cache: by type URL, then by node (MuxCache classifies by
// request only and holds a fixed map; groups are defined at run time here).
type router struct {
	byType map[string]*typeCaches
}

func (r *router) pick(typeURL string, node *corev3.Node) (cachev3.Cache, error) {
	if t := r.byType[typeURL]; t != nil {
		return t.cacheFor(node), nil
	}
	for _, u := range emptyTypes {
		if u == typeURL {
			return emptyCache(u), nil
		}
	}
	return nil, fmt.Errorf("no cache for type %q", typeURL)
}

func (r *router) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, ch chan cachev3.Response) (func(), error) {
	c, err := r.pick(req.GetTypeUrl(), req.GetNode())
	if err != nil {
		return nil, err
	}
	return c.CreateWatch(req, sub, ch)
}

func (r *router) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, ch chan cachev3.DeltaResponse) (func(), error) {
	c, err := r.pick(req.GetTypeUrl(), req.GetNode())
	if err != nil {
		return nil, err
	}
	return c.CreateDeltaWatch(req, sub, ch)
}

func (r *router) Fetch(ctx context.Context, req *cachev3.Request) (cachev3.Response, error) {
	c, err := r.pick(req.GetTypeUrl(), req.GetNode())
	if err != nil {
		return nil, err
	}
	return c.Fetch(ctx, req)
}

// ---- control API (gRPC, protobuf) ------------------------------------------

type control struct {
	controlpb.UnimplementedPeerControlServer
	st     *stats
	byType map[string]*typeCaches
}

func (c *control) Update(_ context.Context, req *controlpb.UpdateRequest) (*controlpb.UpdateResponse, error) {
	for _, u := range req.GetUpdates() {
		lt := lookupType(u.GetType())
		var t *typeCaches
		if lt != nil {
			t = c.byType[lt.typeURL]
		}
		if t == nil {
			return nil, status.Errorf(codes.InvalidArgument, "type %q: expected CDS, EDS, LDS or RDS", u.GetType())
		}
		if err := c.apply(t, u); err != nil {
			return nil, err
		}
	}
	out := &controlpb.UpdateResponse{Versions: map[string]uint64{}}
	for _, t := range c.byType {
		t.xdsType.mu.Lock()
		out.Versions[t.short] = t.version
		t.xdsType.mu.Unlock()
	}
	return out, nil
}

func (c *control) apply(t *typeCaches, u *controlpb.TypeUpdate) error {
	upserts := make(map[string]types.Resource, len(u.GetUpsert()))
	for _, r := range u.GetUpsert() {
		msg := t.newMsg()
		if err := proto.Unmarshal(r.GetBody(), msg); err != nil {
			return status.Errorf(codes.InvalidArgument, "upsert %q: bad %s proto: %v", r.GetName(), t.short, err)
		}
		if got := t.nameOf(msg); got != r.GetName() {
			return status.Errorf(codes.InvalidArgument, "upsert %q: the %s proto names %q", r.GetName(), t.short, got)
		}
		upserts[r.GetName()] = msg
	}
	if len(u.GetGroups()) > 0 && t.short != "CDS" && t.short != "LDS" {
		return status.Errorf(codes.InvalidArgument, "%s: groups are for CDS and LDS only", t.short)
	}

	t.xdsType.mu.Lock()
	defer t.xdsType.mu.Unlock()
	t.mu.Lock()
	for n, r := range upserts {
		t.resources[n] = r
	}
	for _, n := range u.GetDelete() {
		delete(t.resources, n)
	}
	for _, g := range u.GetGroups() {
		members := make(map[string]bool, len(g.GetNames()))
		initial := map[string]types.Resource{}
		for _, n := range g.GetNames() {
			members[n] = true
			if r, ok := t.resources[n]; ok {
				initial[n] = r
			}
		}
		if old := t.groups[g.GetName()]; old != nil {
			old.members = members
			old.cache.SetResources(initial)
		} else {
			t.groups[g.GetName()] = &group{
				cache:   cachev3.NewLinearCache(t.typeURL, cachev3.WithInitialResources(initial)),
				members: members,
			}
		}
	}
	groups := make([]*group, 0, len(t.groups))
	for _, g := range t.groups {
		groups = append(groups, g)
	}
	t.mu.Unlock()
	if len(upserts) == 0 && len(u.GetDelete()) == 0 {
		return nil
	}

	// One cache update for the whole batch per cache: watches are notified once.
	if err := t.all.UpdateResources(upserts, u.GetDelete()); err != nil {
		return status.Errorf(codes.Internal, "%s cache update: %v", t.short, err)
	}
	for _, g := range groups {
		up := map[string]types.Resource{}
		for n, r := range upserts {
			if g.members[n] {
				up[n] = r
			}
		}
		var del []string
		for _, n := range u.GetDelete() {
			if g.members[n] {
				del = append(del, n)
			}
		}
		if len(up) == 0 && len(del) == 0 {
			continue
		}
		if err := g.cache.UpdateResources(up, del); err != nil {
			return status.Errorf(codes.Internal, "%s group cache update: %v", t.short, err)
		}
	}
	t.version++
	c.st.updates.Add(1)
	return nil
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
	controlAddr := flag.String("control", "127.0.0.1:0", "gRPC control API (PeerControl) listen address")
	readyFile := flag.String("ready-file", "", `once listening, write {"xds":..,"control":..} here (temp + rename)`)
	maxUpdate := flag.Int("max-update-bytes", 1<<30, "largest PeerControl.Update request in bytes")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("gcp-peer: ")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	byType := map[string]*typeCaches{}
	for _, t := range served {
		byType[t.typeURL] = &typeCaches{
			xdsType:   t,
			all:       cachev3.NewLinearCache(t.typeURL),
			groups:    map[string]*group{},
			resources: map[string]types.Resource{},
		}
	}

	st := &stats{}
	xdsServer := serverv3.NewServer(ctx, &router{byType: byType}, st.callbacks())

	grpcServer := grpc.NewServer(
		grpc.MaxConcurrentStreams(100000),
		grpc.MaxRecvMsgSize(64<<20),
		grpc.MaxSendMsgSize(math.MaxInt32),
		// No server keepalive pings (the hub sends none either): with a 10 s ping
		// timeout, connections of clients in a saturated harness (one core decoding
		// every sidecar's route tables during the config change) were closed as dead,
		// which counted against the peer as lost updates.
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

	controlServer := grpc.NewServer(grpc.MaxRecvMsgSize(*maxUpdate))
	controlpb.RegisterPeerControlServer(controlServer, &control{st: st, byType: byType})

	xdsLis, err := net.Listen("tcp", *xdsAddr)
	if err != nil {
		log.Fatalf("listen xds %s: %v", *xdsAddr, err)
	}
	ctlLis, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		log.Fatalf("listen control %s: %v", *controlAddr, err)
	}

	errc := make(chan error, 2)
	go func() { errc <- fmt.Errorf("grpc: %w", grpcServer.Serve(xdsLis)) }()
	go func() { errc <- fmt.Errorf("control: %w", controlServer.Serve(ctlLis)) }()

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

	log.Printf("%s", st.summary())
	controlServer.Stop()
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
