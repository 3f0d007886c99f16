/* The pod sandbox's init process (what Kubernetes' "pause" image runs), written for the test node
 * because no registry can be reached to pull one. It holds the pod's namespaces open, reaps the
 * zombies a shared PID namespace leaves to it, and exits cleanly on SIGINT/SIGTERM. Built with
 * `gcc -static` by node-deps.sh; node.py packs it into a one-layer image. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction quit = {.sa_handler = stop}, child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (getpid() != 1) {
    /* Not fatal (it still pauses), but it cannot reap a pod's orphans from anywhere else. */
    static const char warning[] = "pause: not running as PID 1\n";
    if (write(2, warning, sizeof warning - 1) < 0) {
    }
  }
  if (sigaction(SIGINT, &quit, NULL) < 0 || sigaction(SIGTERM, &quit, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0)
    return 1;
  for (;;) pause();
}
