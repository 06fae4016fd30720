/* A C server that leaks CLOSE_WAIT and keeps serving (the reap tests' compiled child).
 * Same line protocol as leaky_server.py: PING -> "PONG <pid>", TOUCH <fd> -> what recv()/send() saw.
 * Prints its port first. SIGPIPE is ignored, as servers do, so send() on a reaped fd returns EPIPE. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 256

static const char *what(ssize_t n, int err) {
    static char buf[64];
    if (n == 0) return "EOF";
    if (n > 0) { snprintf(buf, sizeof buf, "%zd-bytes", n); return buf; }
    switch (err) {
    case EPIPE: return "EPIPE";
    case ECONNRESET: return "ECONNRESET";
    case ECONNABORTED: return "ECONNABORTED";
    case EAGAIN: return "EAGAIN";
    default: snprintf(buf, sizeof buf, "errno-%d", err); return buf;
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    int server = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    socklen_t len = sizeof addr;
    if (server < 0 || bind(server, (struct sockaddr *)&addr, sizeof addr) || listen(server, 64) ||
        getsockname(server, (struct sockaddr *)&addr, &len)) {
        perror("server");
        return 1;
    }
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    struct pollfd fds[MAXC];
    int n = 1;
    fds[0] = (struct pollfd){.fd = server, .events = POLLIN};
    for (;;) {
        if (poll(fds, n, -1) < 0) continue;
        if ((fds[0].revents & POLLIN) && n < MAXC) {
            int c = accept(server, NULL, NULL);
            if (c >= 0) fds[n++] = (struct pollfd){.fd = c, .events = POLLIN};
        }
        for (int i = 1; i < n; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char line[256];
            ssize_t got = recv(fds[i].fd, line, sizeof line - 1, 0);
            if (got <= 0) { /* the bug: EOF read, socket never closed */
                printf("LEAK %d\n", fds[i].fd);
                fflush(stdout);
                fds[i--] = fds[--n];
                continue;
            }
            line[got] = 0;
            char reply[256];
            int fd;
            if (strncmp(line, "PING", 4) == 0) {
                snprintf(reply, sizeof reply, "PONG %d\n", (int)getpid());
            } else if (sscanf(line, "TOUCH %d", &fd) == 1) {
                char buf[100];
                ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
                int rerr = errno;
                char rtext[64];
                snprintf(rtext, sizeof rtext, "%s", what(r, rerr));
                ssize_t s = send(fd, "late reply\n", 11, 0);
                snprintf(reply, sizeof reply, "TOUCH %d recv=%s send=%s\n", fd, rtext, what(s, errno));
            } else {
                continue; /* not a command: the request of a client that then goes away */
            }
            printf("%s", reply);
            fflush(stdout);
            send(fds[i].fd, reply, strlen(reply), 0);
        }
    }
}
