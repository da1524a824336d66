// Command cadvisor is the native tier's cAdvisor: a small main of this project around cAdvisor's own
// `manager` (which reads the cgroups) and `metrics` (which renders them for Prometheus) packages.
//
// The official `main` lives in github.com/google/cadvisor/cmd, a module the Go proxy does not serve, so the
// native tier cannot build it; the compose image (gcr.io/cadvisor/cadvisor at the same release) runs the
// official one. This one serves only what the stack scrapes: /metrics and /healthz, on one address.
//
// Only raw cgroups are watched (no Docker, containerd or CRI-O: the native tier has none), and only those
// whose path starts with one of --raw_cgroup_prefix_whitelist, plus the root cgroup "/", which cAdvisor
// always keeps. Watching every cgroup of a shared machine would report every other process's cgroups, and
// on a cgroup v1 machine with a cgroup2 beside it (/sys/fs/cgroup/unified) would report the same paths
// twice, which the Prometheus registry rejects as duplicate series.
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/google/cadvisor/cache/memory"
	"github.com/google/cadvisor/container"
	v2 "github.com/google/cadvisor/info/v2"
	"github.com/google/cadvisor/manager"
	"github.com/google/cadvisor/metrics"
	"github.com/google/cadvisor/utils/sysfs"
	"github.com/google/cadvisor/version"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	// No container runtime's handler is imported (each registers itself when imported): raw cgroups only,
	// whose handler the manager registers itself.
)

func main() {
	listen := flag.String("listen_address", "127.0.0.1:8080", "host:port that serves /metrics and /healthz")
	prefixes := flag.String("raw_cgroup_prefix_whitelist", "",
		"comma-separated cgroup path prefixes to watch besides the root (required)")
	// --housekeeping_interval (how often each container's stats are read), --max_housekeeping_interval and
	// --allow_dynamic_housekeeping are cAdvisor's own flags, defined by its manager package as in the official
	// binary.
	storage := flag.Duration("storage_duration", 2*time.Minute, "how long stats are kept in memory")
	// What the stack's dashboards and alerts use: CPU (usage, CFS periods and throttling), memory (usage,
	// working set, limits) and OOM events. Every other kind adds series nobody reads (per disk, per
	// network device, per CPU, per process...).
	included := container.MetricSet{}
	if err := included.Set("cpu,memory,oom_event"); err != nil {
		panic(err)
	}
	flag.Var(&included, "enable_metrics", "comma-separated metric kinds to collect (cAdvisor's names)")
	showVersion := flag.Bool("version", false, "print the version and exit")
	klog.InitFlags(nil)
	flag.Parse()

	if *showVersion {
		fmt.Printf("cAdvisor %s (zerocode native build)\n", version.Version)
		return
	}

	whitelist := []string{}
	for _, prefix := range strings.Split(*prefixes, ",") {
		if prefix = strings.TrimSpace(prefix); prefix != "" {
			whitelist = append(whitelist, prefix)
		}
	}
	if len(whitelist) == 0 {
		// cAdvisor's own default, an empty prefix, watches every cgroup of the machine.
		fmt.Fprintln(os.Stderr, "--raw_cgroup_prefix_whitelist is required: the cgroups to watch, e.g. /dice-native-")
		os.Exit(2)
	}

	m, err := manager.New(memory.New(*storage, nil), sysfs.NewRealSysFs(), manager.HousekeepingConfigFlags,
		included, http.DefaultClient, whitelist, nil, "", 0)
	if err != nil {
		klog.Fatalf("cannot create the container manager: %v", err)
	}
	if err := m.Start(); err != nil {
		klog.Fatalf("cannot start the container manager: %v", err)
	}

	registry := prometheus.NewRegistry()
	// id (the cgroup path), name and image only: no container labels or environment variables as labels.
	labels := metrics.BaseContainerLabels(nil)
	registry.MustRegister(
		metrics.NewPrometheusCollector(m, labels, included, clock.RealClock{},
			v2.RequestOptions{IdType: v2.TypeName, Count: 1, Recursive: true}),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)

	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		// As the official /healthz: the manager answers for the root container.
		if _, err := m.GetContainerInfoV2("/", v2.RequestOptions{IdType: v2.TypeName, Count: 1}); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	server := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		_ = m.Stop()
		_ = server.Close()
	}()
	klog.Infof("cAdvisor %s serving /metrics and /healthz on %s, watching %v", version.Version, *listen, whitelist)
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		klog.Fatalf("serving %s: %v", *listen, err)
	}
}
