// Command realcluster is one binary holding the Kubernetes control plane, the kubelet and
// etcd, built from the official Go modules so scripts/realcluster can run a real single-node
// cluster without a registry or prebuilt release binaries.
//
// Usage: realcluster COMPONENT [FLAGS...], or invoked through a symlink named after the
// component. COMPONENT is one of etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet.
//
// Only the chosen component's command is constructed: kube-apiserver's constructor installs
// a process-wide signal handler that panics if installed twice, and building the others would
// register their flags and metrics for nothing.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // CronJob time zones, as the upstream apiserver and controller-manager embed it

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json, as upstream mains register it
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream mains register them
	_ "k8s.io/component-base/metrics/prometheus/version"  // the version metric
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// components maps a component name to a function that builds its cobra command.
var components = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kubelet":                 func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
}

func main() {
	name, args := filepath.Base(os.Args[0]), os.Args[1:]
	if name != "etcd" && components[name] == nil {
		if len(args) == 0 {
			usage()
		}
		name, args = args[0], args[1:]
	}
	if name == "etcd" {
		// etcdmain parses os.Args itself, expecting the program name first.
		etcdmain.Main(append([]string{"etcd"}, args...))
		return
	}
	build := components[name]
	if build == nil {
		usage()
	}
	command := build()
	command.SetArgs(args)
	os.Exit(cli.Run(command))
}

func usage() {
	names := []string{"etcd"}
	for name := range components {
		names = append(names, name)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: realcluster COMPONENT [FLAGS...]\ncomponents: %v\n", names)
	os.Exit(2)
}
